"""Small-scale replication of the STEP paper's Tables 2, 4, 5, 9 and 10 on CPU, every method at
vanilla's FLOPs (paper convention), plus the plots.

    python benchmarks/replicate.py                     # everything: throughput, main table, four ablations
    python benchmarks/replicate.py --suite table4      # one ablation
    python benchmarks/replicate.py --suite throughput  # only the interleaved per-method step timing
    python benchmarks/replicate.py --suite lr          # vanilla lr sweep (not part of "all")
    python benchmarks/replicate.py --suite flops       # STEP / ReLoRA at equal corrected FLOPs (not in "all")

Finished runs are cached in benchmarks/results/runs/ by config; delete that folder for a clean
re-run (the wall-time column and meta.json's run time are only meaningful then).

Scale, and why: d 256, 8 layers, 4 heads, seq 256, 8 sequences per step, a 8192-token BPE trained
on the training text (with GPT-2's 50257 tokens the embedding and head would hold 80 % of the
parameters and dominate time and memory), 100 vanilla steps (~0.2M tokens). That keeps the whole
suite under an hour on 2 CPU cores; the models are far from converged, so read trends, not
absolute perplexities. Adapter and projection ranks are the paper's 128 at d 2048 scaled to
d 256 (r = 16); ReLoRA's reset interval, restart warmup and warm start, and GaLore's projection
gap, are scaled to the run length (see RELORA / GALORE below).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from steplm import config, planner  # noqa: E402
from steplm.evaluate import perplexity  # noqa: E402
from steplm.report import plot_loss_vs_flops, plot_memory  # noqa: E402
from steplm.stages import layer_shape, plan_run  # noqa: E402
from steplm.train import Trainer  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
STEPS = 100
BASE = {
    "data.path": str(DATA / "gutenberg" / "train.jsonl.gz"), "data.val_path": str(DATA / "gutenberg" / "valid.jsonl.gz"),
    "data.tokenizer": "bpe:8192", "data.max_train_tokens": 6_000_000, "data.cache_dir": str(ROOT / ".cache" / "steplm"),
    "model.vocab_size": 8192, "model.d_model": 256, "model.n_layers": 8, "model.n_heads": 4, "model.max_seq_len": 256,
    "train.seq_len": 256, "train.micro_batch": 8, "train.max_steps": STEPS, "train.lr": 3e-3, "train.warmup_steps": 10,
    "train.eval_every": 20, "train.eval_tokens": 32768, "train.log_every": 5, "train.dtype": "bf16",
    "lora.rank": 16, "lora.alpha": 32, "step.n_stages": 2,
}
# ReLoRA (paper: r 128, reset every 5000 steps, restart warmup 500): warm start 25 % of the steps,
# then a reset every quarter of the vanilla step count, with a restart warmup of 10 % of that.
RELORA = {"method": "relora", "lora.warm_start_fraction": 0.25, "lora.relora_interval": STEPS // 4,
          "lora.relora_warmup": max(1, STEPS // 40)}
# GaLore (paper: r 128, update_proj_gap 200, scale 0.25, lr 1e-2): projection refreshed 4 times a run.
GALORE = {"method": "galore", "galore.rank": 16, "galore.update_proj_gap": STEPS // 4, "galore.scale": 0.25,
          "train.lr": 1e-2}
STEP = {"method": "step"}
SEEDS = (0, 1, 2)
WIKI_TOKENS = 65536


def budget_bytes() -> int:
    """The named memory budget for the planner row: vanilla's layer states at its depth (Eq. 1)."""
    cfg = config.load(None, [f"{k}={v}" for k, v in BASE.items()])
    return plan_run(cfg).vanilla["planned_state_bytes"]["layers"]


def budget_row() -> dict:
    """STEP-2stages sized by the budget planner: the deepest model whose peak fits budget_bytes()."""
    cfg = config.load(None, [f"{k}={v}" for k, v in BASE.items()])
    plan = planner.deepest_within(budget_bytes(), 2, layer_shape(cfg.model), cfg.lora.rank)
    L = sum(plan.layers_per_stage)
    # train.max_steps is a vanilla-equivalent budget for the model's own depth: scale it so the
    # FLOPs equal the vanilla's (6·N·T with N proportional to the layer count).
    return {**STEP, "model.n_layers": L, "step.layers_per_stage": json.dumps(plan.layers_per_stage),
            "train.max_steps": round(cfg.train.max_steps * cfg.model.n_layers / L)}


SUITES = {
    "main": {
        "vanilla": [{"train.seed": s} for s in SEEDS],
        "relora": [RELORA],
        "galore": [GALORE],
        "step-2stages": [{**STEP, "train.seed": s} for s in SEEDS],
        "step-3stages": [{**STEP, "step.n_stages": 3}],
        "step-2stages-budget": [None],  # sized from BASE by budget_row(), see suite()
    },
    "table4": {f"position={p}": [{**STEP, "step.position": p}] for p in ("upper", "intermediate", "lower", "random")},
    "table5": {"with PET": [STEP], "without PET": [{"method": "step-no-pet"}]},
    "table9": {f"{i}{' + FPI' if f else ''}": [{**STEP, "step.init": i, "step.fpi": f}]
               for i in ("copy", "mean") for f in (False, True)},
    "table10": {f"grow at {int(g * 100)} %": [{**STEP, "step.growth_fraction": g}] for g in (0.25, 0.5, 0.75, 1.0)},
    # Not part of "all" (EXTRA_SUITES): the budget matched with the corrected FLOPs count (frozen layers 4N, head,
    # attention), under which the cheap stages buy fewer extra tokens than under the paper's 2N.
    "flops": {"step-2stages, corrected FLOPs": [{**STEP, "step.flops_convention": "corrected", "train.seed": s}
                                                for s in SEEDS],
              "relora, corrected FLOPs": [{**RELORA, "step.flops_convention": "corrected"}]},
    # Not part of "all" (EXTRA_SUITES): checks that vanilla's lr (shared by every method but GaLore) is not a handicap.
    "lr": {f"vanilla lr={lr:g}": [{"train.lr": lr, "train.seed": s} for s in SEEDS] for lr in (1e-3, 2e-3, 3e-3, 6e-3)},
}
PAPER_TRENDS = {
    "table4": "paper: Upper best (lowest perplexity)",
    "table5": "paper: with PET better than without",
    "table9": "paper: Mean without FPI best",
    "table10": "paper: growing at 75 % best",
}
TITLES = {"main": "Table 2 (main comparison)", "lr": "Vanilla learning-rate sweep (not in the paper)",
          "flops": "Equal FLOPs under the corrected count (not in the paper)",
          **{k: f"{k} ablation — {v}" for k, v in PAPER_TRENDS.items()}}
EXTRA_SUITES = ("flops", "lr")


def suite(name: str) -> dict[str, list[dict]]:
    """A suite's variants per method, with the budget row sized from the current BASE."""
    out = dict(SUITES[name])
    if name == "main":
        out["step-2stages-budget"] = [budget_row()]
    return out


def cached(cfg, out_root: Path) -> Path | None:
    """A finished run directory trained with exactly this config, if there is one."""
    for d in sorted((out_root / "runs").glob("*")):
        if (d / "summary.json").is_file() and (d / "wikitext.json").is_file() and (d / "config.yaml").is_file():
            if config.load(d / "config.yaml").to_dict() == cfg.to_dict():
                return d
    return None


def run(overrides: dict, out_root: Path) -> dict:
    """Train (or reuse an identical finished run) and add WikiText perplexity."""
    items = {**BASE, **overrides}
    cfg = config.load(None, [f"{k}={v}" for k, v in items.items()])
    # Rows shared by several tables train once: reuse any finished run whose saved config, read
    # with today's schema (new keys take their defaults), equals this one.
    key = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    d = cached(cfg, out_root) or out_root / "runs" / key
    if (d / "summary.json").is_file() and (d / "wikitext.json").is_file():
        s = json.loads((d / "summary.json").read_text())
    else:
        t0 = time.perf_counter()
        s = Trainer(cfg, d, progress=False).fit()
        s["wall_seconds"] = time.perf_counter() - t0
        (d / "summary.json").write_text(json.dumps(s, indent=2))
        wiki = perplexity(str(d), str(DATA / "wikitext2" / "test.txt"), WIKI_TOKENS, seq_len=256)
        (d / "wikitext.json").write_text(json.dumps(wiki))
    s["wikitext_ppl"] = json.loads((d / "wikitext.json").read_text())["ppl"]
    s["run_dir"] = str(d)
    return s


def spread(xs):
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def row(method: str, summaries: list[dict]) -> dict:
    peak_planned = max(st["planned_state_bytes"]["total"] for st in summaries[0]["stages"])
    peak_measured = max(st["measured_state_bytes"]["total"] for st in summaries[0]["stages"])
    peak_tracked = max((st["peak_bytes"] or 0) for st in summaries[0]["stages"])
    val = [s["final_val_ppl"] for s in summaries]
    wiki = [s["wikitext_ppl"] for s in summaries]
    last = summaries[0]["stages"][-1]
    first = summaries[0]["stages"][0]
    return {"method": method, "val_ppl": statistics.mean(val), "val_ppl_spread": spread(val),
            "wikitext_ppl": statistics.mean(wiki), "wikitext_ppl_spread": spread(wiki),
            "planned_peak_bytes": peak_planned, "measured_peak_bytes": peak_measured,
            "tracked_peak_bytes": peak_tracked, "layers_per_stage": summaries[0]["layers_per_stage"],
            "tokens": summaries[0]["tokens_seen"], "flops": summaries[0]["flops"],
            "wall_seconds": statistics.mean(s["wall_seconds"] for s in summaries),
            "tokens_per_second": statistics.mean(s["tokens_per_second"] for s in summaries),
            "first_stage_step_seconds": first["step_seconds"] / max(1, first["steps"] - 1),
            "last_stage_step_seconds": last["step_seconds"] / max(1, last["steps"] - 1),
            "seeds": [s.get("seed", i) for i, s in enumerate(summaries)], "n_seeds": len(summaries),
            "run_dirs": [s["run_dir"] for s in summaries]}


# Throughput per method: every method's final stage (the same final depth as its vanilla), built in
# one process and timed in interleaved rounds, so that machine noise hits all methods alike.
TP_WARMUP, TP_ROUNDS, TP_STEPS = 2, 4, 4


def final_stage_trainer(overrides: dict, out_dir: Path) -> Trainer:
    """A trainer moved straight to its last stage (grown, frozen and adapted as in a real run)."""
    cfg = config.load(None, [f"{k}={v}" for k, v in {**BASE, **overrides}.items()])
    t = Trainer(cfg, out_dir, progress=False)
    while t.stage < len(t.stage_steps) - 1:
        t.next_stage()
    return t


def throughput(variants: dict[str, dict]) -> list[dict]:
    """Median optimizer-step time of each method's final stage, against vanilla at the same depth."""
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {m: final_stage_trainer(o, Path(tmp) / str(i)) for i, (m, o) in enumerate(variants.items())}
        for t in trainers.values():
            for _ in range(TP_WARMUP):
                t.train_step()
        times = {m: [] for m in trainers}
        names = list(trainers)
        for r in range(TP_ROUNDS):
            for m in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
                for _ in range(TP_STEPS):
                    t0 = time.perf_counter()
                    trainers[m].train_step()
                    times[m].append(time.perf_counter() - t0)
        rows = []
        for m, t in trainers.items():
            c = t.cfg.train
            layers = len(t.model.model.layers)
            ref = next(v for v, o in variants.items() if o.get("method", "vanilla") == "vanilla"
                       and len(trainers[v].model.model.layers) == layers)
            step_s = statistics.median(times[m])
            rows.append({"method": m, "final_layers": layers,
                         "trainable_params": sum(p.numel() for p in t.model.parameters() if p.requires_grad),
                         "step_seconds": step_s, "tokens_per_second": c.micro_batch * c.grad_accum * c.seq_len / step_s,
                         "vanilla_reference": ref, "step_time_vs_vanilla": step_s / statistics.median(times[ref]),
                         "steps_timed": len(times[m])})
    return rows


def throughput_table(rows: list[dict]) -> str:
    lines = ["| method (final stage) | layers | trainable params | step time (s, median) | tokens/s | "
             "step time / vanilla step (same depth) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['final_layers']} | {r['trainable_params']:,} | {r['step_seconds']:.3f} | "
                     f"{r['tokens_per_second']:,.0f} | {r['step_time_vs_vanilla']:.2f} |")
    return "\n".join(lines)


def fmt_ppl(mean, sd, n):
    return f"{mean:.1f} ± {sd:.1f}" if n > 1 else f"{mean:.1f}"


def table(rows: list[dict], tp: dict[str, dict] | None = None) -> str:
    """Table-2-style markdown; the last column comes from the interleaved throughput measurement."""
    mib = 2**20
    lines = ["| method | layers/stage | planned peak (MiB) | measured peak (MiB) | tracked peak (MiB) | val ppl | "
             "WikiText ppl | tokens | FLOPs | wall (s) | final-stage step / vanilla step |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{tp[r['method']]['step_time_vs_vanilla']:.2f}" if tp and r["method"] in tp else "–"
        lines.append(f"| {r['method']} | {'→'.join(map(str, r['layers_per_stage']))} | "
                     f"{r['planned_peak_bytes'] / mib:.1f} | {r['measured_peak_bytes'] / mib:.1f} | "
                     f"{r['tracked_peak_bytes'] / mib:.1f} | {fmt_ppl(r['val_ppl'], r['val_ppl_spread'], r['n_seeds'])} | "
                     f"{fmt_ppl(r['wikitext_ppl'], r['wikitext_ppl_spread'], r['n_seeds'])} | {r['tokens']:,} | "
                     f"{r['flops']:.3g} | {r['wall_seconds']:.0f} | {rel} |")
    return "\n".join(lines)


def throughput_variants() -> dict[str, dict]:
    """The main table's methods (first seed), plus a vanilla as deep as the budget row."""
    variants = {m: vs[0] for m, vs in suite("main").items()}
    L = variants["step-2stages-budget"]["model.n_layers"]
    return {**variants, f"vanilla-{L}-layers": {"model.n_layers": L}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="all", choices=["all", "throughput", *SUITES])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args()
    if not (DATA / "gutenberg" / "train.jsonl.gz").is_file():
        sys.exit(f"replicate: error: {DATA} lacks gutenberg/train.jsonl.gz (the shared data)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    minutes = {}
    suites = ["throughput", *(s for s in SUITES if s not in EXTRA_SUITES)] if a.suite == "all" else [a.suite]
    tp = None
    if (out / "throughput_methods.json").is_file():
        tp = {r["method"]: r for r in json.loads((out / "throughput_methods.json").read_text())}
    for name in suites:
        t_suite = time.perf_counter()
        if name == "throughput":
            print("[throughput] every method's final stage, interleaved", file=sys.stderr, flush=True)
            tp_rows = throughput(throughput_variants())
            tp = {r["method"]: r for r in tp_rows}
            md = throughput_table(tp_rows)
            (out / "throughput_methods.md").write_text(f"### Throughput per method (final stage, interleaved)\n\n{md}\n")
            (out / "throughput_methods.json").write_text(json.dumps(tp_rows, indent=2))
            print(f"\n{md}\n")
            minutes[name] = (time.perf_counter() - t_suite) / 60
            continue
        rows = []
        for method, variants in suite(name).items():
            print(f"[{name}] {method}: {len(variants)} run(s)  ({(time.perf_counter() - t_start) / 60:.1f} min so far)",
                  file=sys.stderr, flush=True)
            summaries = []
            for v in variants:
                s = run(v, out)
                s["seed"] = v.get("train.seed", 0)
                summaries.append(s)
            rows.append(row(method, summaries))
        md = table(rows, tp if name == "main" else None)
        title = TITLES[name]
        stem = "replication" if name == "main" else name
        (out / f"{stem}.md").write_text(f"### {title}\n\n{md}\n")
        (out / f"{stem}.json").write_text(json.dumps(rows, indent=2))
        print(f"\n### {title}\n\n{md}\n")
        if name == "main":
            by = {r["method"]: r for r in rows}
            plot_loss_vs_flops({m: by[m]["run_dirs"][0] for m in by}, out / "loss_vs_flops.png")
            plot_memory(by["step-3stages"]["run_dirs"][0], out / "memory_step3.png",
                        vanilla_dir=by["vanilla"]["run_dirs"][0])
            print(f"memory budget for the planner row: {budget_bytes() / 2**20:.2f} MiB of layer states "
                  f"(vanilla's at {BASE['model.n_layers']} layers)")
        minutes[name] = (time.perf_counter() - t_suite) / 60
    total = (time.perf_counter() - t_start) / 60
    if a.suite == "all":  # what made the committed results, and how long it took
        meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                "minutes_per_suite": minutes, "total_minutes": total,
                "runs": len(list((out / "runs").glob("*/summary.json")))}
        (out / "meta.json").write_text(json.dumps(meta, indent=2))
    print(f"total wall time: {total:.1f} min", file=sys.stderr)


if __name__ == "__main__":
    main()
