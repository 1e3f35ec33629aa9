"""Final weights_sha256 of seven short reference runs, one per code path of the trainer: vanilla,
STEP-3stages (LoRA), STEP-2stages with ReLoRA resets, STEP without PET, ReLoRA, GaLore, and SFT.

    python benchmarks/reference_runs.py --out hashes.json            # record
    python benchmarks/reference_runs.py --compare hashes.json        # exit 1 if any hash differs

A refactoring that claims to change no behaviour records the hashes before and compares after, on
the same machine (hashes are reproducible per machine, not across CPUs). Each run is a fresh
`steplm` process with train.host_allocator=system (the default retained heap can change a run's
rounding from process to process).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
STEPLM = [sys.executable, "-m", "steplm"]
TINY = ["--data", str(DATA / "shakespeare" / "input.txt"), "--max-steps", "24", "--quiet",
        "--set", "train.host_allocator=system", "--set", "train.eval_every=0", "--set", "data.max_train_tokens=200000"]
RUNS = {
    "vanilla": ["configs/tiny.yaml"],
    "step-3stages": ["configs/tiny-step3.yaml", "--set", "lora.relora_interval=0"],
    "step-relora": ["configs/tiny-step.yaml", "--set", "lora.relora_interval=6", "--set", "lora.relora_warmup=2"],
    "step-no-pet": ["configs/tiny-step.yaml", "--set", "method=step-no-pet", "--set", "lora.relora_interval=0"],
    "relora": ["configs/tiny.yaml", "--set", "method=relora", "--set", "lora.relora_interval=6"],
    "galore": ["configs/tiny.yaml", "--set", "method=galore", "--set", "galore.update_proj_gap=8"],
}


def run(args: list[str], tmp: Path) -> str:
    """The weights_sha256 of the run that ``args`` (ending in --out DIR) writes."""
    env = {**os.environ, "STEPLM_CACHE_DIR": str(tmp / "tokens"), "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"reference_runs: {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return json.loads((Path(args[-1]) / "summary.json").read_text())["weights_sha256"]


def hashes() -> dict[str, str]:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, args in RUNS.items():
            out[name] = run([*STEPLM, "train", *args, *TINY, "--out", str(tmp / name)], tmp)
            print(f"{name}: {out[name]}", file=sys.stderr, flush=True)
        out["sft"] = run([*STEPLM, "sft", str(tmp / "vanilla"), "--data", str(DATA / "alpaca" / "seed_tasks.jsonl"),
                          "--limit", "24", "--epochs", "1", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "0",
                          "--quiet", "--set", "train.host_allocator=system", "--out", str(tmp / "sft")], tmp)
        print(f"sft: {out['sft']}", file=sys.stderr)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help="write the hashes (JSON) here")
    g.add_argument("--compare", help="compare with the hashes (JSON) recorded here")
    a = ap.parse_args()
    now = hashes()
    if a.out:
        Path(a.out).write_text(json.dumps(now, indent=2) + "\n")
        return
    before = json.loads(Path(a.compare).read_text())
    differ = [k for k in before if before[k] != now.get(k)]
    print(json.dumps({"same": [k for k in before if k not in differ], "differ": differ}, indent=2))
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
