"""Train-step throughput, measured fairly: steplm against the loop a user writes in ten lines with
Hugging Face, autocast, torch.compile and fused AdamW; all rows built in one process and
timed in interleaved rounds (the order rotates every round), so that machine noise hits all alike.

Rows (issue #11):
- GPT-2 shape, d 256, 8 layers, 4 heads, vocabulary 50257, batch 8 x 256:
  steplm; steplm with the unfused head + cross-entropy (the lever, before/after);
  HF LlamaForCausalLM (sdpa) + autocast + torch.compile + fused AdamW; HF eager fp32 + AdamW.
  Both steplm and the compiled HF loop train in bf16 autocast where the CPU has native bf16
  matmuls (AVX-512 bf16 / AMX), and in fp32 where it has not (there bf16 is emulated, ~10x slower):
  the same rule as train.dtype=auto.
  steplm with glibc's default host allocator (train.host_allocator=system: the lever, before/after);
  the compiled HF loop with steplm's retained heap (allocator.retain_host_memory), a control.
- Replication shape, vocabulary 8192, batch 16 x 256: steplm; steplm with torch's flash attention
  backward (train.attention_matmul_backward=false: the lever, before/after); the compiled HF loop,
  also with steplm's retained heap; a STEP
  2-stage run's final stage against vanilla of the same depth, with the FLOPs-predicted ratio, and
  the same final stage with its adapters switched off: the floor no adapter implementation can beat.

Each row runs under its own host-allocator policy, switched untimed before its block of steps:
steplm's rows as steplm runs them (it retains freed heap memory on CPU), the HF loop as a user runs
it (glibc's defaults, as far as one process can go back to them: allocator.retain_host_memory(False)
leaves the retained free chunks in the heap, which favours those rows). So "steplm / HF compiled"
compares the two as each runs, and "both with the retained heap" compares the code alone.

A large GEMM in that dtype probes the matmul ceiling; each row's MFU is its model FLOPs/s (the corrected
count of flops.py: 6·N + 6·V·d + 12·L·s·d per token) over that ceiling. ``--profile`` prints
torch.profiler's top operators for steplm's step with the fused and with the unfused loss. Every run
prints the tracked peak memory of one eager step of each, and each ratio's range over the rounds
(the rows of a round run back to back, so that range shows the machine's noise).

    python benchmarks/throughput.py [--rounds 6 --steps 4] [--json benchmarks/results/throughput.json]

``--loss-chunks``, ``--attention`` and ``--lora-linear`` time one part of the step alone instead.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from steplm import config  # noqa: E402
from steplm.plan import flops  # noqa: E402
from steplm.allocator import retain_host_memory  # noqa: E402
from steplm.passes import parallelize  # noqa: E402
from steplm.devices import cpu_name  # noqa: E402
from steplm.train.loop import Trainer  # noqa: E402
from steplm.train.metrics import cpu_peak_step

GPT2 = {"model.vocab_size": 50257, "model.d_model": 256, "model.n_layers": 8, "model.n_heads": 4,
        "train.micro_batch": 8, "train.seq_len": 256}
REPL = {**GPT2, "model.vocab_size": 8192, "train.micro_batch": 16}
FLOOR = "steplm V8192 STEP-2 final stage, no adapters"
FLASH = "steplm V8192, torch flash attention backward"
SYSTEM = "steplm, glibc's default host allocator"
HF = "HF compiled (sdpa, autocast, fused AdamW)"
HF_RETAIN = "HF compiled, steplm's retained heap"
HF8 = "HF compiled V8192"
HF8_RETAIN = "HF compiled V8192, steplm's retained heap"
WARMUP = 2


def gpt2_dir() -> str:
    cand = ROOT.parent / "shared" / "data" / "tokenizers" / "gpt2"
    return str(cand) if (cand / "vocab.json").is_file() else "bpe:50257"


def steplm_trainer(shape: dict, tmp: Path, name: str, **extra) -> Trainer:
    tok = gpt2_dir() if shape["model.vocab_size"] == 50257 else "bpe:8192"
    sets = {"data.path": sysconfig.get_paths()["stdlib"], "data.exclude": "[test, tests, idle_test, site-packages]",
            "data.tokenizer": tok, "data.max_train_tokens": 2_000_000,
            "data.cache_dir": str(ROOT / ".cache" / "steplm"), "model.max_seq_len": shape["train.seq_len"],
            "train.max_steps": 1000, "train.dtype": "auto", "train.compile": True, "train.warmup_steps": 10,
            "train.eval_every": 0, **shape, **extra}
    cfg = config.load(None, [f"{k}={v}" for k, v in sets.items()])
    t = Trainer(cfg, tmp / name, progress=False)
    while t.stage < len(t.stage_steps) - 1:  # a staged method: time its final stage
        t.next_stage()
    return t


def without_adapters(t: Trainer) -> Trainer:
    """The same trainer with its frozen linears' adapters switched off (rank 0: the frozen bf16 GEMM
    alone) and its step recompiled: the floor that no adapter implementation can go below, since an
    adapter only adds work to a frozen linear. The adapters stay in the optimizer with no gradient."""
    from steplm.passes.lora import lora_modules

    for m in lora_modules(t.model):
        m.rank = 0
    parallelize.parallelize(t)
    return t


def with_lora_function(t: Trainer, fn, cast_input: bool = True) -> Trainer:
    """The trainer with every adapted frozen linear calling ``fn`` (an autograd.Function with
    lora._LoRALinearFunction's signature) instead of steplm's, and its step recompiled: the whole-step
    A/B of adapter_cost.py and lora_stacking_ab.py. ``cast_input``: cast x to the matmul dtype before
    the call, as LoRALinear does (False: ``fn`` casts it)."""
    from steplm.passes.lora import LoRALinear, lora_modules

    def forward(m):
        def f(x):
            dtype = LoRALinear.compute_dtype(x)
            return fn.apply(x.to(dtype) if cast_input else x, m.weight, m.bias, m.lora_A, m.lora_B, m.scaling, dtype)
        return f
    for m in lora_modules(t.model):
        m.forward = forward(m)
    parallelize.parallelize(t)
    return t


def stage_ab_args(doc: str) -> argparse.Namespace:
    """The command line of the whole-step A/B scripts on a STEP-2 final stage (adapter_cost.py,
    lora_stacking_ab.py): --rank, --rounds, --steps, --json."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (default: lora.rank's default, as throughput.py)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", help="write the result here")
    return ap.parse_args()


def trainer_step(t: Trainer):
    def step():
        t.train_step()
        t.optimizer.zero_grad(set_to_none=True)
        t.step_in_stage += 1
    return step


def bf16_fast() -> bool:
    """Whether this CPU has native bf16 matmuls (AVX-512 bf16 / AMX); without them bf16 is emulated
    and slower than fp32, and train.dtype=auto picks fp32 (so does the HF loop here)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def hf_step(shape: dict, compiled: bool):
    """The user's own loop: LlamaForCausalLM, AdamW, clipping; compiled + fused (+ bf16 autocast where
    the CPU has native bf16), or eager fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from steplm.model.llama import default_ffn_hidden
    d, V = shape["model.d_model"], shape["model.vocab_size"]
    B, T = shape["train.micro_batch"], shape["train.seq_len"]
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=V, hidden_size=d, intermediate_size=default_ffn_hidden(d), num_hidden_layers=shape["model.n_layers"],
        num_attention_heads=shape["model.n_heads"], max_position_embeddings=T, tie_word_embeddings=False,
        attn_implementation="sdpa" if compiled else "eager"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=compiled)
    g = torch.Generator().manual_seed(0)

    def loss_fn(x):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compiled and bf16_fast()):
            return model(input_ids=x, labels=x).loss

    fn = torch.compile(loss_fn) if compiled else loss_fn

    def step():
        x = torch.randint(0, V, (B, T), generator=g)
        fn(x).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def matmul_ceiling(n: int = 4096, reps: int = 10) -> float:
    """GEMM FLOP/s of this machine's threads in the training dtype (bf16 where native, else fp32;
    n x n x n, best of ``reps``)."""
    dt = torch.bfloat16 if bf16_fast() else torch.float32
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def model_flops_per_token(shape: dict, trainable_layers: int | None = None, frozen_layers: int = 0) -> int:
    """Corrected-count training FLOPs per token (flops.py), every layer trainable unless given."""
    d, L = shape["model.d_model"], shape["model.n_layers"]
    from steplm.model.llama import default_ffn_hidden
    P = 4 * d * d + 3 * d * default_ffn_hidden(d) + 2 * d
    n_tr = P * (L if trainable_layers is None else trainable_layers)
    return flops.flops_per_token(n_tr, frozen_layers * P, "corrected", n_layers=L, d_model=d,
                                 seq_len=shape["train.seq_len"], vocab_size=shape["model.vocab_size"])


def profile(t: Trainer, label: str, rows: int = 12):
    from torch.profiler import ProfilerActivity, profile as tprofile
    step = trainer_step(t)
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step()
    print(f"\n== torch.profiler: {label} (2 steps, self CPU time)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def tracked_peak(shape: dict, tmp: Path, fused: bool) -> int:
    """Peak tracked tensor bytes of one eager step (MemTracker), fused or unfused loss."""
    t = steplm_trainer(shape, tmp, f"peak-{fused}", **{"train.compile": False, "train.fused_loss": fused})
    t.train_step()
    t.optimizer.zero_grad(set_to_none=True)
    return cpu_peak_step(lambda: t.train_step(), t.model, t.optimizer, t)


def interleaved(fns: dict, rounds: int, reps: int, before=None, log: bool = False,
                setup: dict | None = None) -> dict[str, list[float]]:
    """Seconds per call of each fn, one list entry per round: every round runs every fn ``reps``
    times back to back, in an order that rotates by one each round, so machine noise hits all alike.
    ``before`` (if given) runs before every call, inside the timing (the same cost for every fn);
    ``setup[name]`` (if given) runs before each of that fn's blocks of ``reps`` calls, untimed."""
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            if setup and k in setup:
                setup[k]()
            t0 = time.perf_counter()
            for _ in range(reps):
                if before is not None:
                    before()
                fns[k]()
            times[k].append((time.perf_counter() - t0) / reps)
        if log:
            print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    return times


def median(xs: list[float]) -> float:
    """The median (the mean of the two middle values for an even count)."""
    return statistics.median(xs)


def loss_chunk_sweep(shape: dict, chunk_rows=(128, 256, 512, 1024), rounds: int = 6, reps: int = 4,
                     compiled: bool = True) -> dict:
    """The head + loss alone at ``shape`` (forward and backward, bf16 autocast where native, compiled
    unless ``compiled`` is False): seconds of the fused loss at each chunk height (rows per chunk,
    ``loss.linear_cross_entropy``'s ``max_rows``) and of the unfused head + F.cross_entropy, in
    interleaved rounds, with each one's tracked peak bytes in eager mode (MemTracker)."""
    import torch.nn.functional as F
    from torch.distributed._tools.mem_tracker import MemTracker

    from steplm.model.loss import linear_cross_entropy
    d, V = shape["model.d_model"], shape["model.vocab_size"]
    n = shape["train.micro_batch"] * shape["train.seq_len"]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(V, d, generator=g) * d ** -0.5)
    y = torch.randint(0, V, (n,), generator=g)
    dt = torch.bfloat16 if bf16_fast() else torch.float32

    def loss(rows):
        if rows is None:
            return lambda: F.cross_entropy((h @ w.t()).float(), y)
        return lambda: linear_cross_entropy(h, w, y, chunk_bytes=2**62, max_rows=rows)

    def timed(f):
        f = torch.compile(f) if compiled else f

        def step():
            with torch.autocast("cpu", dtype=dt, enabled=dt != torch.float32):
                f().backward()
        return step
    losses = {**{f"fused, {r}-row chunks": loss(r) for r in chunk_rows}, "unfused": loss(None)}
    fns = {k: timed(f) for k, f in losses.items()}

    def clear():
        h.grad = w.grad = None
    for f in fns.values():
        f()
        clear()
    times = interleaved(fns, rounds, reps, before=clear)
    peaks = {}
    for k, f in losses.items():
        clear()
        mt = MemTracker()
        mt.track_external(h, w)
        with mt, torch.autocast("cpu", dtype=dt, enabled=dt != torch.float32):
            f().backward()
        peaks[k] = max(mt.get_tracker_snapshot("peak")[torch.device("cpu")].values())
    med = {k: median(v) for k, v in times.items()}
    return {k: {"seconds_median": med[k], "speed_vs_unfused": med["unfused"] / med[k], "tracked_peak_bytes": peaks[k]}
            for k in fns}


def attention_sweep(shape: dict, rounds: int = 6, reps: int = 5, seed: int = 0, compiled: bool = True) -> dict:
    """One layer's causal attention at ``shape`` (bf16, forward + backward, compiled unless
    ``compiled`` is False): torch's SDPA
    (the CPU flash kernel's backward) against steplm's ``attention.CausalAttention`` (the same flash
    forward, a backward of batched matmuls), in interleaved rounds; each one's relative L2 error of
    dq, dk and dv against SDPA in fp64."""
    import torch.nn.functional as F

    from steplm.model.attention import BLOCK, SLICE_BYTES, CausalAttention
    B, H, T = shape["train.micro_batch"], shape["model.n_heads"], shape["train.seq_len"]
    hd = shape["model.d_model"] // H
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, hd, generator=g).bfloat16().requires_grad_() for _ in range(3))
    do = torch.randn(B, H, T, hd, generator=g).bfloat16()
    impls = {"torch SDPA (flash backward)": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
             "steplm CausalAttention (matmul backward)":
                 lambda q, k, v: CausalAttention.apply(q, k, v, hd ** -0.5, SLICE_BYTES, BLOCK)}
    impls = {name: torch.compile(f) for name, f in impls.items()} if compiled else impls
    fns = {name: (lambda f: lambda: f(q, k, v).backward(do))(f) for name, f in impls.items()}

    def clear():
        q.grad = k.grad = v.grad = None
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    F.scaled_dot_product_attention(q64, k64, v64, is_causal=True).backward(do.double())
    errors = {}
    for name, f in fns.items():
        clear()
        f()
        errors[name] = {n: ((t.grad.double() - r.grad).norm() / r.grad.norm()).item()
                        for n, t, r in zip("qkv", (q, k, v), (q64, k64, v64))}
    med = {k: median(v) for k, v in interleaved(fns, rounds, reps, before=clear).items()}
    ref = med["torch SDPA (flash backward)"]
    return {k: {"seconds_median": med[k], "vs_torch": med[k] / ref, "relative_l2_error_vs_fp64": errors[k]}
            for k in fns}


def lora_linear_sweep(shape: dict, rank: int = 16, rounds: int = 6, reps: int = 10) -> dict:
    """One linear of the replication shape, forward and backward, eager, in interleaved rounds: a
    trainable one (fp32 master weight, autocast), a frozen bf16 one with no adapter (what freezing
    alone saves: the weight-gradient GEMM), and a frozen one with steplm's rank-``rank`` adapter
    (``lora._LoRALinearFunction``). Seconds per call and the ratio to the trainable linear, per
    (in, out) of the block's linears (attention d→d, MLP d→f and f→d)."""
    import torch.nn.functional as F

    from steplm.passes.lora import _LoRALinearFunction
    d, n = shape["model.d_model"], shape["train.micro_batch"] * shape["train.seq_len"]
    f = config.load(None, [f"model.d_model={d}"]).model.ffn_hidden
    dt = torch.bfloat16 if bf16_fast() else torch.float32
    g = torch.Generator().manual_seed(0)
    res = {}
    for n_in, n_out in ((d, d), (d, f), (f, d)):
        x = torch.randn(n, n_in, generator=g, requires_grad=True)
        grad_y = torch.randn(n, n_out, generator=g)
        w32 = torch.nn.Parameter(torch.randn(n_out, n_in, generator=g) * n_in ** -0.5)
        w16 = w32.detach().to(torch.bfloat16)
        a = torch.nn.Parameter(torch.randn(rank, n_in, generator=g) * n_in ** -0.5)
        b = torch.nn.Parameter(torch.randn(n_out, rank, generator=g) * 0.01)

        def trainable():
            with torch.autocast("cpu", dtype=dt, enabled=dt != torch.float32):
                F.linear(x, w32).backward(grad_y)

        def frozen():
            F.linear(x.to(dt), w16.to(dt)).backward(grad_y.to(dt))

        def adapter():
            _LoRALinearFunction.apply(x, w16, None, a, b, 2.0, dt).backward(grad_y)
        fns = {"trainable": trainable, "frozen, no adapter": frozen, f"frozen + rank-{rank} adapter": adapter}
        for fn in fns.values():
            fn()

        def clear():
            x.grad = w32.grad = a.grad = b.grad = None
        med = {k: median(v) for k, v in interleaved(fns, rounds, reps, before=clear).items()}
        res[f"{n_in}->{n_out}"] = {k: {"seconds_median": v, "vs_trainable": v / med["trainable"]} for k, v in med.items()}
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per row per round")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler tables and tracked peaks")
    ap.add_argument("--json", help="write the result here (e.g. benchmarks/results/throughput.json)")
    ap.add_argument("--loss-chunks", action="store_true",
                    help="only time the head + loss (compiled) per chunk height at the GPT-2 and replication "
                         "shapes, against the unfused loss")
    ap.add_argument("--attention", action="store_true",
                    help="only time one layer's attention (torch's flash backward, steplm's matmul backward) "
                         "at the replication shape")
    ap.add_argument("--lora-linear", action="store_true",
                    help="only time one linear (trainable, frozen, frozen + adapter) at the replication shape")
    a = ap.parse_args()
    if a.lora_linear:
        res = lora_linear_sweep(REPL, rounds=a.rounds)
        print(f"{'linear, N = 16x256 tokens, fwd + bwd':<40} {'ms':>7} {'vs trainable':>13}")
        for shape, rows in res.items():
            for k, v in rows.items():
                print(f"{shape + ', ' + k:<40} {1e3 * v['seconds_median']:>7.3f} {v['vs_trainable']:>13.3f}")
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
        return
    if a.attention:
        res = attention_sweep(REPL, rounds=a.rounds)
        print(f"{'attention, B16 H4 T256 hd64, fwd + bwd':<42} {'ms':>7} {'vs torch':>9} {'rel. error dq/dk/dv':>24}")
        for k, v in res.items():
            err = "/".join(f"{e:.1e}" for e in v["relative_l2_error_vs_fp64"].values())
            print(f"{k:<42} {1e3 * v['seconds_median']:>7.2f} {v['vs_torch']:>9.3f} {err:>24}")
        if a.json:
            Path(a.json).write_text(json.dumps({"date": datetime.date.today().isoformat(), "machine": cpu_name(),
                                                "threads": torch.get_num_threads(), "torch": torch.__version__,
                                                "rounds": a.rounds, **res}, indent=2) + "\n")
        return
    if a.loss_chunks:
        res = {}
        for label, shape in (("V50257 batch 8x256", GPT2), ("V8192 batch 16x256", REPL)):
            res[label] = loss_chunk_sweep(shape, rounds=a.rounds)
            print(f"{'head + loss, ' + label:<34} {'s':>7} {'speed vs unfused':>17} {'tracked peak MiB':>17}")
            for k, v in res[label].items():
                print(f"{k:<34} {v['seconds_median']:>7.3f} {v['speed_vs_unfused']:>17.3f} "
                      f"{v['tracked_peak_bytes'] / 2**20:>17.0f}")
        if a.json:
            Path(a.json).write_text(json.dumps({"date": datetime.date.today().isoformat(), "machine": cpu_name(),
                                                "threads": torch.get_num_threads(), "torch": torch.__version__,
                                                "rounds": a.rounds, **res}, indent=2) + "\n")
        return
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    trainers = {
        "steplm": steplm_trainer(GPT2, tmp, "a"),
        "steplm, unfused loss": steplm_trainer(GPT2, tmp, "b", **{"train.fused_loss": False}),
        "steplm V8192": steplm_trainer(REPL, tmp, "c"),
        FLASH: steplm_trainer(REPL, tmp, "f", **{"train.attention_matmul_backward": False}),
        "steplm V8192 STEP-2 final stage": steplm_trainer(REPL, tmp, "d", method="step", **{"step.n_stages": 2}),
        FLOOR: without_adapters(steplm_trainer(REPL, tmp, "e", method="step", **{"step.n_stages": 2})),
    }
    trainers[SYSTEM] = steplm_trainer(GPT2, tmp, "g", **{"train.host_allocator": "system"})
    steps = {name: trainer_step(t) for name, t in trainers.items()}
    steps[HF] = hf_step(GPT2, compiled=True)
    steps[HF_RETAIN] = hf_step(GPT2, compiled=True)
    steps["HF eager fp32"] = hf_step(GPT2, compiled=False)
    steps[HF8] = hf_step(REPL, compiled=True)
    steps[HF8_RETAIN] = hf_step(REPL, compiled=True)
    shapes = {n: (REPL if "V8192" in n else GPT2) for n in steps}
    # each row runs under its own host-allocator policy, switched untimed before its block: steplm's
    # rows as steplm runs them (train.host_allocator=retain), the HF loop as a user runs it (glibc's
    # defaults), and both the other way round as controls
    system = {SYSTEM, HF, "HF eager fp32", HF8}
    setup = {n: (lambda keep=n not in system: retain_host_memory(keep)) for n in steps}
    for name, fn in steps.items():  # compile + warm-up
        setup[name]()
        for _ in range(WARMUP):
            fn()
    print(f"build + compile + warm-up: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    times = interleaved(steps, a.rounds, a.steps, log=True, setup=setup)
    retain_host_memory(True)  # the peaks and the profile below: steplm as it runs
    ceiling = matmul_ceiling()
    step_final = trainers["steplm V8192 STEP-2 final stage"]
    st = step_final.current_stage
    fpt = {n: model_flops_per_token(shapes[n]) for n in steps}
    fpt["steplm V8192 STEP-2 final stage"] = st.flops_per_token["corrected"]
    fpt[FLOOR] = st.flops_per_token["corrected"]  # counted as the adapted stage: the MFU it would reach
    rows = []
    for n in steps:
        sec = median(times[n])
        tok = shapes[n]["train.micro_batch"] * shapes[n]["train.seq_len"]
        rows.append({"row": n, "shape": "V8192 batch 16x256" if shapes[n] is REPL else "V50257 batch 8x256",
                     "step_seconds_median": sec, "tokens_per_s": tok / sec, "flops_per_token": fpt[n],
                     "mfu": fpt[n] * tok / sec / ceiling})
    by = {r["row"]: r for r in rows}
    van = by["steplm V8192"]
    predicted = st.flops_per_token["corrected"] / van["flops_per_token"]
    # each ratio as (numerator row, denominator row, speed or time), its median-step value and the
    # range of its per-round values: rows of a round ran back to back, so that range is the noise
    pairs = {
        "steplm / HF compiled, V50257": ("steplm", HF, "speed"),
        "steplm / HF compiled, V8192": ("steplm V8192", HF8, "speed"),
        "steplm / HF compiled, both with the retained heap, V50257": ("steplm", HF_RETAIN, "speed"),
        "steplm / HF compiled, both with the retained heap, V8192": ("steplm V8192", HF8_RETAIN, "speed"),
        "steplm / HF eager fp32, V50257": ("steplm", "HF eager fp32", "speed"),
        "retained heap / glibc defaults, steplm V50257": ("steplm", SYSTEM, "speed"),
        "retained heap / glibc defaults, HF compiled V50257": (HF_RETAIN, HF, "speed"),
        "fused / unfused loss, V50257": ("steplm", "steplm, unfused loss", "speed"),
        "matmul / flash attention backward, V8192": ("steplm V8192", FLASH, "speed"),
        "STEP final-stage step / vanilla step, V8192": ("steplm V8192 STEP-2 final stage", "steplm V8192", "time"),
        "STEP final stage without adapters (floor) / vanilla step, V8192": (FLOOR, "steplm V8192", "time"),
    }
    def ratio(kind, tn, td):  # noqa: E306
        return td / tn if kind == "speed" else tn / td
    ratios = {k: ratio(kind, by[n]["step_seconds_median"], by[d]["step_seconds_median"])
              for k, (n, d, kind) in pairs.items()}
    spread = {k: [f(ratio(kind, tn, td) for tn, td in zip(times[n], times[d])) for f in (min, max)]
              for k, (n, d, kind) in pairs.items()}
    res = {
        "date": datetime.date.today().isoformat(), "machine": cpu_name(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "native_bf16": bf16_fast(),
        "dtype": str(trainers["steplm"].dtype).replace("torch.", ""), "rounds": a.rounds, "steps": a.steps,
        "gemm_ceiling_flops_per_s": ceiling, "rows": rows,
        "ratios": {**ratios, "STEP final stage, predicted by corrected FLOPs": predicted},
        "ratios_per_round_range": spread,
        "targets": {"steplm / HF compiled, V50257": 1.5, "steplm / HF compiled, V8192": 1.3,
                    "STEP final-stage step / vanilla step, V8192": f"<= {1.05 * predicted:.3f} (1.05 x predicted)"},
        "step_final_stage_layers_per_stage": step_final.layers_per_stage,
    }
    print(f"{res['dtype']} GEMM ceiling: {ceiling / 1e12:.2f} TFLOP/s on {res['threads']} threads "
          f"(native bf16: {res['native_bf16']})")
    print(f"{'row':<52} {'tokens/s':>9} {'step s':>8} {'MFU':>6}")
    for r in rows:
        print(f"{r['row']:<52} {r['tokens_per_s']:>9,.0f} {r['step_seconds_median']:>8.3f} {100 * r['mfu']:>5.1f}%")
    for k, v in res["ratios"].items():
        lo_hi = f"  (rounds: {spread[k][0]:.3f}-{spread[k][1]:.3f})" if k in spread else ""
        print(f"{k}: {v:.3f}{lo_hi}")
    peaks = {f: tracked_peak(GPT2, tmp, f) for f in (False, True)}
    res["tracked_peak_bytes_one_step"] = {"unfused": peaks[False], "fused": peaks[True]}
    print(f"tracked peak of one eager step, V50257 batch 8x256: unfused {peaks[False] / 2**20:.0f} MiB, "
          f"fused {peaks[True] / 2**20:.0f} MiB")
    if a.profile:
        profile(trainers["steplm, unfused loss"], "unfused head + cross-entropy")
        profile(trainers["steplm"], "fused chunked linear + cross-entropy")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
