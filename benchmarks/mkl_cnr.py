"""The speed cost of MKL's reproducible mode: a training step with ``MKL_CBWR=AUTO`` (what ``import
steplm`` sets, src/steplm/_reproducible.py) against CNR off (``MKL_CBWR=``), side by side.

    python benchmarks/mkl_cnr.py            # free cores: about 6 minutes on a 2-core Xeon
    python benchmarks/mkl_cnr.py --smoke    # a tiny shape, seconds (tests/test_determinism.py)

MKL reads ``MKL_CBWR`` once, at its first call, so each timing is a fresh child process: a Trainer
of a vanilla LLaMA at SHAPE on random token ids (benchmarks/measure.py), WARMUP steps, then STEPS
timed optimizer steps. Rounds interleave the two settings (the order alternates from round to
round), so drift in the machine's speed falls on both. Each child asks MKL for the mode it runs in
(``mkl_serv_cbwr_get``: 2 = AUTO, 1 = off), and the row records it. Two dtypes: fp32, where MKL
computes every matmul, and the CPU's default (``train.dtype=auto``: bf16 where the CPU has native
bf16 matmuls, where MKL computes only attention's fp32 score matmul in the backward and oneDNN the
rest).

Writes benchmarks/results/mkl_cnr.json: one row per dtype with ``auto_step_seconds`` and
``off_step_seconds`` (medians over rounds of each child's median step), ``ratio`` (AUTO / off, the
median of the per-round ratios) and ``round_ratios``; and mkl_cnr.md.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHAPE = {"model.vocab_size": 8192, "model.d_model": 768, "model.n_layers": 6, "model.n_heads": 12,
         "model.max_seq_len": 512, "train.seq_len": 512, "train.micro_batch": 4}
SMOKE_SHAPE = {"model.vocab_size": 512, "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 2,
               "model.max_seq_len": 64, "train.seq_len": 64, "train.micro_batch": 2}
SETTINGS = {"AUTO": "AUTO", "off": ""}  # the row's name: the value of MKL_CBWR in the child
MODES = {"AUTO": 2, "off": 1}  # what mkl_serv_cbwr_get(MKL_CBWR_ALL) answers in each (MKL_CBWR_AUTO, _BRANCH_OFF)
ROUNDS, WARMUP, STEPS = 5, 2, 5
DTYPES = ("fp32", "bf16", "auto")  # train.dtype's values


def child(dtype: str, shape: dict, warmup: int, steps: int) -> dict:
    """In a fresh process: the step times (seconds) of a vanilla run at ``shape`` and MKL's CNR mode."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from measure import data_overrides, step, trainer

    with tempfile.TemporaryDirectory() as tmp:
        overrides = {**data_overrides(Path(tmp)), **shape, "train.dtype": dtype, "train.max_steps": 1000,
                     "train.warmup_steps": 10, "train.eval_every": 0, "train.compile": False}
        t = trainer(None, overrides, Path(tmp) / "run")
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        for _ in range(warmup):
            step(t)
        seconds = [step(t) for _ in range(steps)]
        return {"seconds": seconds, "mkl_cbwr_mode": lib.mkl_serv_cbwr_get(-1), "dtype": str(t.dtype).split(".")[-1],
                "threads": torch.get_num_threads()}


def run_child(setting: str, dtype: str, smoke: bool, warmup: int, steps: int) -> dict:
    env = dict(os.environ, MKL_CBWR=SETTINGS[setting], PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, __file__, "--child", dtype, "--warmup", str(warmup), "--steps", str(steps)]
    res = subprocess.run(cmd + (["--smoke"] if smoke else []), capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"mkl_cnr: the {setting} child ({dtype}) failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure(dtypes: list[str], rounds: int, warmup: int, steps: int, smoke: bool) -> list[dict]:
    rows = []
    for dtype in dtypes:
        per = {s: [] for s in SETTINGS}
        modes, trained = {}, None
        for i in range(rounds):
            order = list(SETTINGS) if i % 2 == 0 else list(SETTINGS)[::-1]
            for s in order:
                r = run_child(s, dtype, smoke, warmup, steps)
                if r["mkl_cbwr_mode"] != MODES[s]:  # every child, not only the last: a row is one mode's
                    raise SystemExit(f"mkl_cnr: a child set to MKL_CBWR={SETTINGS[s]!r} ran in MKL mode "
                                     f"{r['mkl_cbwr_mode']}, not {MODES[s]}: its time would be misread as {s}'s")
                per[s].append(statistics.median(r["seconds"]))
                modes[s], trained, threads = r["mkl_cbwr_mode"], r["dtype"], r["threads"]
            print(f"[mkl_cnr] {dtype} round {i + 1}/{rounds}: AUTO {per['AUTO'][-1]:.3f} s, "
                  f"off {per['off'][-1]:.3f} s a step", file=sys.stderr, flush=True)
        ratios = [a / o for a, o in zip(per["AUTO"], per["off"])]
        rows.append({"dtype": dtype, "trained_dtype": trained, "threads": threads,
                     "auto_step_seconds": statistics.median(per["AUTO"]),
                     "off_step_seconds": statistics.median(per["off"]), "ratio": statistics.median(ratios),
                     "round_ratios": ratios, "mkl_cbwr_mode": modes, "rounds": rounds, "warmup": warmup,
                     "steps": steps})
    return rows


def at_least(low: int):
    """An argparse type: an integer >= ``low`` (0 rounds or steps would leave nothing to take a median of)."""
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}")
        if v < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {v}")
        return v
    return parse


def dtypes_arg(s: str) -> list[str]:
    """An argparse type: comma-separated train.dtype values, at least one."""
    names = [d.strip() for d in s.split(",") if d.strip()]
    bad = [d for d in names if d not in DTYPES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected comma-separated values of {', '.join(DTYPES)}, got {s!r}")
    return names


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny shape, one round, seconds")
    ap.add_argument("--out", default=str(RESULTS), help="results folder (default benchmarks/results)")
    ap.add_argument("--dtypes", type=dtypes_arg, default="fp32,auto",
                    help="comma-separated train.dtype values (default fp32,auto)")
    ap.add_argument("--rounds", type=at_least(1), default=None, help=f"default {ROUNDS}; --smoke 1")
    ap.add_argument("--warmup", type=at_least(0), default=WARMUP)
    ap.add_argument("--steps", type=at_least(1), default=STEPS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    shape = SMOKE_SHAPE if a.smoke else SHAPE
    if a.child:
        print(json.dumps(child(a.child, shape, a.warmup, a.steps)))
        return
    import torch
    sys.path.insert(0, str(ROOT / "src"))
    from steplm.devices import cpu_name
    rounds = a.rounds if a.rounds is not None else (1 if a.smoke else ROUNDS)
    t0 = time.perf_counter()
    rows = measure(a.dtypes, rounds, a.warmup, a.steps, a.smoke)
    meta = {"machine": cpu_name(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "bf16_native": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "shape": shape,
            "date": time.strftime("%Y-%m-%d"), "minutes": (time.perf_counter() - t0) / 60}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mkl_cnr.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["| train.dtype | trained in | threads | AUTO (s/step) | off (s/step) | AUTO / off | rounds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['trained_dtype']} | {r['threads']} | {r['auto_step_seconds']:.3f} | "
                     f"{r['off_step_seconds']:.3f} | {r['ratio']:.3f} | "
                     f"{', '.join(f'{x:.3f}' for x in r['round_ratios'])} |")
    command = shlex.join(["python", "benchmarks/mkl_cnr.py", *(sys.argv[1:] if argv is None else argv)])
    (out / "mkl_cnr.md").write_text(
        "### The speed cost of MKL_CBWR=AUTO against CNR off\n\n"
        f"{meta['machine']}, {meta['cpus']} CPUs, torch {meta['torch']}, {meta['date']}; a vanilla LLaMA "
        f"(d {shape['model.d_model']}, {shape['model.n_layers']} layers, micro-batch {shape['train.micro_batch']} "
        f"x {shape['train.seq_len']}), {a.warmup} warm-up and {a.steps} timed steps in a fresh process per "
        f"setting and round, the rounds interleaved. Command: `{command}`.\n\n"
        + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
