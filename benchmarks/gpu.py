"""GPU memory and throughput at the paper's 368M shape, next to the paper's Table 2 and the planner.

    PYTHONPATH=src python3 benchmarks/gpu.py                 # one H100/H200-class GPU, about 5-8 minutes
    PYTHONPATH=src python3 benchmarks/gpu.py --dry-run       # tiny shape on CPU, seconds (the test runs this)

For vanilla, STEP-2stages (7 -> 12 layers), ReLoRA, GaLore, and vanilla and STEP-2stages with
torchao's 8-bit AdamW moments (issue #15; skipped with a note where torchao is not installed), at
d 1600, 12 layers, 25 heads, seq 1024, GPT-2's vocabulary (50257), bf16 autocast, activation
checkpointing and one shared micro-batch, it trains STEPS_PER_STAGE optimizer steps in every
stage (moving through the stages with Trainer.next_stage(), as a real run does at its growth steps)
and records per stage
torch.cuda.max_memory_allocated, the live model-state bytes, the planner's prediction (Eq. 1-2 +
embeddings) and tokens/s over the timed steps, with the step measurement that paper_shapes.py uses
(benchmarks/measure.py; on the CPU of --dry-run the peak is MemTracker's). Writes
benchmarks/results/gpu.json (and .md).

After the training rows, at the same shape (issue #16): perplexity throughput (tokens/s over
non-overlapping windows, bf16 autocast), zero-shot task throughput (4-choice items/s through the
tasks' batched log-likelihood scorer), and an SFT step on the shared trainer (train.sft.sft_trainer:
tokens/s and torch.cuda.max_memory_allocated), from a model directory that a one-step run writes.

Tokens are drawn uniformly from the whole vocabulary: memory and speed do not depend on the text,
and the device machine has no copy of the shared data. GaLore needs galore-torch; where it is not
installed, the wheel in shared/wheels/ is put on sys.path (it is pure Python), and where neither
is there the GaLore row is skipped with a note.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

sys.path.insert(0, str(ROOT / "benchmarks"))

from measure import data_overrides, peak_source, peak_step, reset_peak, step, trainer  # noqa: E402
from steplm import config  # noqa: E402
from steplm.train.loop import Trainer  # noqa: E402

# The paper's Table 2, 368M model, memory column (GB), in its row order Vanilla, ReLoRA, GaLore, STEP.
PAPER_TABLE2_GB = {"vanilla": 5.9, "relora": 5.9, "galore": 3.3, "step-2stages": 3.4}
SHAPE = {"model.vocab_size": 50257, "model.d_model": 1600, "model.n_layers": 12, "model.n_heads": 25,
         "model.max_seq_len": 1024, "train.seq_len": 1024}
TINY = {"model.vocab_size": 512, "model.d_model": 32, "model.n_layers": 4, "model.n_heads": 2,
        "model.max_seq_len": 256, "train.seq_len": 256}  # room for the Alpaca template in the SFT row
COMMON = {"train.micro_batch": 8, "train.grad_accum": 1, "train.activation_checkpointing": True,
          "train.dtype": "auto", "train.lr": 5e-4, "train.warmup_steps": 10, "train.max_steps": 1000,
          "train.eval_every": 0, "lora.rank": 128, "lora.alpha": 256, "galore.rank": 128,
          "galore.update_proj_gap": 200, "galore.scale": 0.25, "step.n_stages": 2}
METHODS = {"vanilla": {}, "step-2stages": {"method": "step", "step.layers_per_stage": "[7,5]"},
           "relora": {"method": "relora", "lora.relora_interval": 5000, "lora.relora_warmup": 500},
           "galore": {"method": "galore", "train.lr": 1e-2},
           # issue #15: the same two runs with torchao's 8-bit AdamW moments (block-wise, fp32 master weights)
           "vanilla-8bit": {"train.optimizer_states": "8bit"},
           "step-2stages-8bit": {"method": "step", "step.layers_per_stage": "[7,5]", "train.optimizer_states": "8bit"}}
STEPS_PER_STAGE, WARMUP = 100, 5
EVAL_WINDOWS, TASK_ITEMS, SFT_STEPS = 64, 500, 30
GB = 1e9


def galore_available() -> bool:
    """Whether galore_torch imports, after putting a carried wheel (shared/wheels) on sys.path."""
    try:
        import galore_torch  # noqa: F401
        return True
    except ImportError:
        for whl in sorted((ROOT / "shared" / "wheels").glob("galore_torch-*.whl")):
            sys.path.insert(0, str(whl))
            try:
                import galore_torch  # noqa: F401
                return True
            except ImportError:
                sys.path.remove(str(whl))
        return False


def measure(method: str, overrides: dict, steps: int, warmup: int, tmp: Path) -> dict:
    """Per stage: peak bytes (max_memory_allocated over the stage's steps on CUDA, MemTracker's over
    its last step on CPU), live and planned model-state bytes, and tokens/s over the steps between
    the first ``warmup`` and the last (measure.step / measure.peak_step, as paper_shapes.py)."""
    t = trainer(None, overrides, tmp / method)
    stages = []
    while True:
        reset_peak(t.device)
        for _ in range(warmup):
            step(t)
        seconds = [step(t) for _ in range(steps - warmup - 1)]
        peak, live = peak_step(t)  # the last step: gradients still held, the paper's 16 B/param counts them
        st = t.current_stage
        stages.append({"stage": t.stage + 1, "layers": st.layers, "kind": st.kind, "peak_bytes": peak,
                       "peak_source": peak_source(t.device),
                       "model_state_bytes": live["total"], "planned_state_bytes": st.planned_state_bytes["total"],
                       "tokens_per_second": t.task.step_tokens(t) * len(seconds) / sum(seconds), "steps": steps})
        if t.stage == len(t.stage_steps) - 1:
            break
        t.next_stage()
    cuda = t.device.type == "cuda"
    del t
    if cuda:
        torch.cuda.empty_cache()
    return {"method": method, "paper_table2_gb": PAPER_TABLE2_GB.get(method),
            "peak_gb": max((s["peak_bytes"] or 0) for s in stages) / GB,
            "peak_model_state_gb": max(s["model_state_bytes"] for s in stages) / GB,
            "planned_peak_gb": max(s["planned_state_bytes"] for s in stages) / GB, "stages": stages}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def eval_and_sft(base: dict, tmp: Path, windows: int, items: int, sft_steps: int, warmup: int) -> dict:
    """Perplexity tokens/s, task items/s and an SFT step's tokens/s and peak memory at the shape of
    ``base``, from a model directory written by a one-step vanilla run (random weights: throughput
    and memory do not depend on what the model knows)."""
    from steplm.devices import autocast
    from steplm.io.run_dir import load_model_dir
    from steplm.eval.perplexity import windows_loss
    from steplm.train.sft import sft_trainer, sft_config
    from steplm.io.run_dir import source_config
    from steplm.eval.tasks import loglikelihoods

    src = tmp / "sft-source"
    cfg = config.load(None, [f"{k}={v}" for k, v in {**base, "train.max_steps": 1, "train.warmup_steps": 1,
                                                      "train.eval_tokens": 2 * base["train.seq_len"]}.items()])
    Trainer(cfg, src, progress=False).fit()
    p = load_model_dir(str(src), cfg.train.device if cfg.train.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    device, dtype = next(p.model.parameters()).device, torch.bfloat16 if cfg.train.dtype != "fp32" else torch.float32
    model, V, T = p.model.eval(), p.config.vocab_size, p.config.max_seq_len
    g = torch.Generator().manual_seed(0)
    out = {}

    w = torch.randint(0, V, (windows, T + 1), generator=g).numpy()
    with autocast(device, dtype):
        windows_loss(model, w[:8], 8, device)  # warm-up
        sync()
        t0 = time.perf_counter()
        _, count = windows_loss(model, w, 8, device)
        sync()
    out["perplexity_tokens_per_second"] = count / (time.perf_counter() - t0)

    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "far", "away", "home"]
    def phrase(n):  # noqa: E306
        return " ".join(words[i] for i in torch.randint(0, len(words), (n,), generator=g).tolist())
    requests = [(phrase(T // 32), " " + phrase(T // 128 + 1)) for _ in range(items * 4)]  # 4 choices per item
    tok, eos = p.tokenizer, p.special.eos_id
    def encode(s):  # noqa: E306
        return tok.encode(s, add_special_tokens=False).ids
    with autocast(device, dtype):
        loglikelihoods(model, encode, eos, requests[:32], batch_size=32)
        sync()
        t0 = time.perf_counter()
        loglikelihoods(model, encode, eos, requests, batch_size=32)
        sync()
    out["task_items_per_second"] = items / (time.perf_counter() - t0)
    del model, p

    data = tmp / "sft.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": phrase(T // 32), "input": "", "output": phrase(T // 16)})
                              for _ in range(8 * (sft_steps + 1))))
    scfg = sft_config(str(src), str(data), source_config(str(src)), epochs=1, lr=1e-4, warmup_steps=10,
                      batch_size=8, micro_batch=8, device=cfg.train.device, dtype=cfg.train.dtype,
                      overrides=[f"train.activation_checkpointing={cfg.train.activation_checkpointing}"])
    t = sft_trainer(scfg, tmp / "sft", progress=False)
    lengths = [len(ids) for ids, _ in t.task.examples]
    cuda = t.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for i in range(sft_steps):
        if i == warmup:
            sync()
            t0, step0 = time.perf_counter(), i
        t.train_step()
        t.optimizer.zero_grad(set_to_none=True)
        t.account()
    sync()
    tokens = sum(lengths) / len(lengths) * t.task.batch_examples * (sft_steps - step0)
    out.update(sft_tokens_per_second=tokens / (time.perf_counter() - t0),
               sft_max_memory_allocated_gb=torch.cuda.max_memory_allocated() / GB if cuda else None,
               sft_examples_per_step=t.task.batch_examples, sft_mean_example_tokens=sum(lengths) / len(lengths),
               windows=windows, window_tokens=T, task_items=items, sft_steps=sft_steps)
    del t
    if cuda:
        torch.cuda.empty_cache()
    return out


def table(rows: list[dict]) -> str:
    lines = ["| method | stages (layers) | paper Table 2 (GB) | planned model states (GB) | live model states (GB) | "
             "peak (GB) | tokens/s per stage |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['method']} | skipped: {r['skipped']} | | | | | |")
            continue
        lines.append(f"| {r['method']} | {'→'.join(str(s['layers']) for s in r['stages'])} | "
                     f"{r['paper_table2_gb'] or '–'} | {r['planned_peak_gb']:.2f} | {r['peak_model_state_gb']:.2f} | "
                     f"{r['peak_gb']:.2f} | {', '.join(format(s['tokens_per_second'], ',.0f') for s in r['stages'])} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shape on CPU, 3 steps per stage (for tests)")
    ap.add_argument("--steps", type=int, default=STEPS_PER_STAGE, help="optimizer steps per stage")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        sys.exit("gpu.py: error: no CUDA device; use --dry-run for the CPU path")
    shape = TINY if a.dry_run else SHAPE
    steps, warmup = (3, 1) if a.dry_run else (a.steps, WARMUP)
    extra = {"train.device": "cpu", "train.dtype": "fp32", "lora.rank": 4, "galore.rank": 4} if a.dry_run else {}
    rows = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = {**COMMON, **shape, **data_overrides(tmp)}
        for method, over in METHODS.items():
            if method == "galore" and not galore_available():
                rows.append({"method": method, "skipped": "galore_torch not importable (no shared/wheels wheel)"})
                continue
            if method.endswith("-8bit") and importlib.util.find_spec("torchao") is None:
                rows.append({"method": method, "skipped": "torchao not importable (8-bit AdamW moments)"})
                continue
            o = {**base, **over, **extra}
            if a.dry_run and "step.layers_per_stage" in over:  # the tiny shape's 4 layers, split 2 + 2
                o["step.layers_per_stage"] = "[2,2]"
            print(f"[gpu] {method}", file=sys.stderr, flush=True)
            rows.append(measure(method, o, steps, warmup, tmp))
        print("[gpu] perplexity, tasks, SFT", file=sys.stderr, flush=True)
        o = {**base, **extra}
        ev = eval_and_sft(o, tmp, *((4, 8, 3, 1) if a.dry_run else (EVAL_WINDOWS, TASK_ITEMS, SFT_STEPS, WARMUP)))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() and not a.dry_run else "cpu",
              "torch": torch.__version__, "dry_run": a.dry_run, "shape": shape, "common": COMMON,
              "steps_per_stage": steps, "timed_from_step": warmup, "minutes": (time.perf_counter() - t_start) / 60,
              "rows": rows, "eval_and_sft": ev}
    (out / "gpu.json").write_text(json.dumps(result, indent=2))
    md = table(rows) + (
        f"\n\nSame shape, bf16 autocast: perplexity {ev['perplexity_tokens_per_second']:,.0f} tokens/s; zero-shot "
        f"tasks {ev['task_items_per_second']:,.1f} items/s (4 choices); SFT step {ev['sft_tokens_per_second']:,.0f} "
        f"tokens/s, max allocated {ev['sft_max_memory_allocated_gb'] or 0:.2f} GB ({ev['sft_examples_per_step']} "
        f"examples of ~{ev['sft_mean_example_tokens']:.0f} tokens per step).")
    (out / "gpu.md").write_text(f"### GPU memory and throughput, 368M shape ({result['device']})\n\n{md}\n")
    print(md)
    return result


if __name__ == "__main__":
    main()
