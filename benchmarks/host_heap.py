"""The retained host heap's price in memory: a step's resident peak under train.host_allocator=retain
against glibc's own allocator (system), for the same tensors.

    python benchmarks/host_heap.py                       # 368M width, 3 + 2 layers, micro-batch 8 x 1024
    python benchmarks/host_heap.py --micro-batch 1 --layers 3,2

For each allocator and each STEP stage, a fresh process builds the run (configs/paper-368m.yaml at
the given depth, random tokens, bf16 autocast, activation checkpointing, eager), takes two steps,
resets the kernel's resident high-water mark (/proc/self/clear_refs), and takes one more step under
MemTracker. It prints the step's resident peak (VmHWM), MemTracker's tracked peak, their ratio, and
the retained/system ratio of the resident peaks. Linux only (clear_refs, VmHWM); about a minute per
process at the default shape on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9

CHILD = """
import gc, json, sys, tempfile
from pathlib import Path
sys.path.insert(0, {src!r}); sys.path.insert(0, {bench!r})
from measure import data_overrides, peak_step, step, trainer

def vm(key):
    return next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines()
                if l.startswith(key))

sets, stage = json.loads(sys.argv[1]), int(sys.argv[2])
with tempfile.TemporaryDirectory() as tmp:
    t = trainer({config!r}, {{**data_overrides(Path(tmp)), **sets}}, Path(tmp) / "run")
    while t.stage < stage - 1:
        t.next_stage()
    step(t); step(t); gc.collect()
    before = vm("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from here
    tracked, _ = peak_step(t)
    print(json.dumps({{"rss_before": before, "resident_peak": vm("VmHWM"), "tracked_peak": tracked}}))
"""


def measure(allocator: str, stage: int, sets: dict) -> dict:
    """One fresh process: the resident and tracked peaks (bytes) of one step at ``stage``."""
    code = CHILD.format(src=str(ROOT / "src"), bench=str(ROOT / "benchmarks"),
                        config=str(ROOT / "configs" / "paper-368m.yaml"))
    res = subprocess.run([sys.executable, "-c", code, json.dumps({**sets, "train.host_allocator": allocator}),
                          str(stage)], capture_output=True, text=True, timeout=3600)
    if res.returncode:
        sys.exit(f"host_heap: {allocator} stage {stage} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--layers", default="3,2", help="STEP-2stages split at 368M width (default 3,2)")
    ap.add_argument("--out", help="also write the rows to this JSON file")
    a = ap.parse_args(argv)
    split = [int(x) for x in a.layers.split(",")]
    sets = {"train.micro_batch": a.micro_batch, "model.n_layers": sum(split), "step.layers_per_stage": str(split),
            "train.grad_accum": 1, "train.compile": False, "train.dtype": "auto",
            "train.activation_checkpointing": True, "train.eval_every": 0, "train.checkpoint_every": 0}
    rows = []
    print("| stage | host heap | tracked peak (GB) | resident peak (GB) | resident / tracked |")
    print("|---|---|---|---|---|")
    for stage in range(1, len(split) + 1):
        got = {alloc: measure(alloc, stage, sets) for alloc in ("system", "retain")}
        for alloc, r in got.items():
            rows.append({"stage": stage, "host_allocator": alloc, **r})
            print(f"| {stage} | {alloc} | {r['tracked_peak'] / GB:.2f} | {r['resident_peak'] / GB:.2f} | "
                  f"{r['resident_peak'] / r['tracked_peak']:.2f} |", flush=True)
        print(f"| {stage} | retain / system | | {got['retain']['resident_peak'] / got['system']['resident_peak']:.2f}x "
              f"| |", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
