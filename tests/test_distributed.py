"""torchrun on CPU (gloo, 2 processes): a 2-stage STEP run under DDP ends with the weights of a
single-process run with the same global batch."""
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import ROOT, tiny_overrides, torchrun_args

pytestmark = pytest.mark.slow


def train(tmp_path, out, nproc, micro_batch, **extra):
    sets = tiny_overrides(tmp_path, **{"method": "step", "step.n_stages": 2, "step.layers_per_stage": "[2,2]",
                                       "train.max_steps": 8, "train.micro_batch": micro_batch,
                                       "train.checkpoint_every": 4}, **extra)
    args = ["-m", "steplm", "train", "--out", str(out), "--quiet", *[x for kv in sets for x in ("--set", kv)]]
    if nproc > 1:
        args = [*torchrun_args(nproc), *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)
    # a rank's own one-line error first: the other ranks' tracebacks that follow it fill the tail
    said = "\n".join(ln for ln in res.stderr.splitlines() if "steplm: " in ln)
    assert res.returncode == 0, f"{said}\n...\n{res.stderr[-3000:]}"
    return load_file(str(out / "model.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    """One process with micro-batch 4, and the same global batch as 2 x 2 accumulated: the second
    differs from the first only in floating-point summation order, which gives the noise floor
    that Adam amplifies over the run (its first steps are nearly sign(g)·lr)."""
    tmp = tmp_path_factory.mktemp("single")
    runs = {}
    for fused in (True, False):  # FSDP2's DTensor shards run the foreach AdamW kernel, not the fused one
        kw = {"train.fused_optimizer": fused}
        runs[fused] = (train(tmp, tmp / f"single{fused}", 1, 4, **kw),
                       train(tmp, tmp / f"accum{fused}", 1, 2, **{"train.grad_accum": 2}, **kw))
    return tmp, runs


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_two_processes_match_one(single_runs, tmp_path, parallel):
    tmp, runs = single_runs
    single, accum = runs[parallel == "ddp"]
    multi = train(tmp, tmp_path / parallel, 2, 2, **{"train.parallel": parallel})
    floor = max_diff(single, accum)
    worst = max_diff(single, multi)
    assert floor < 1e-3  # fp32 noise, far below the weights' own movement
    assert worst <= max(1e-5, 4 * floor), (worst, floor)
    import json
    rows = [json.loads(x) for x in (tmp_path / parallel / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == {1, 2}  # the distributed run grew (and re-wrapped) once
    # tokens and FLOPs count every rank's sequences: the same global batch, the same totals as one process
    summaries = [json.loads((d / "summary.json").read_text()) for d in (tmp / "singleTrue", tmp_path / parallel)]
    steps = sum(summaries[0]["stage_steps"])  # STEP's FLOPs-matched steps: more than the 8 vanilla steps
    assert summaries[0]["tokens_seen"] == summaries[1]["tokens_seen"] == steps * 4 * 32, summaries  # global batch 4
    assert summaries[0]["flops"] == summaries[1]["flops"]
    steps = [r["step"] for r in rows if "loss" in r]
    single_steps = [json.loads(x)["step"] for x in (tmp / "singleTrue" / "metrics.jsonl").read_text().splitlines()
                    if '"loss"' in x]
    assert steps == single_steps and len(set(steps)) == len(steps)  # rank 0 alone wrote the log, once per step


_PROBE = """
import gc, os, sys
from torch.nn.parallel import DistributedDataParallel
from steplm import cli
from steplm.train.loop import Trainer
rc = cli.main(sys.argv[1:])
objs = gc.get_objects()  # before any collection of ours: what main left for interpreter exit
left = sum(isinstance(o, (DistributedDataParallel, Trainer)) for o in objs)
# one file per rank: the two ranks share one stdout, where their prints interleaved (CI)
with open(os.path.join(os.environ["PROBE_DIR"], "rank" + os.environ["RANK"]), "w") as f:
    f.write(f"rank {os.environ['RANK']} rc {rc} left {left}")
sys.exit(rc)
"""


@pytest.mark.parametrize("parallel,fault,rc", [("ddp", None, 0), ("fsdp2", None, 0),
                                               ("ddp", "sigterm_after_step:2", 75)])
def test_no_trainer_or_wrapper_outlives_the_run(tmp_path, parallel, fault, rc):
    """The trainer and its DDP wrapper sit in reference cycles and hold the gloo process group; left
    to interpreter exit, that group's teardown aborted a rank of a successful run (SIGABRT, CI).
    Each rank must have freed them when the command returns: after a finished run, and after a
    preempted one (exit 75), whose exception's traceback would otherwise keep the trainer alive."""
    probe = tmp_path / "probe.py"
    probe.write_text(_PROBE)
    sets = tiny_overrides(tmp_path, **{"train.max_steps": 4, "train.micro_batch": 2, "train.parallel": parallel})
    args = [*torchrun_args(2), str(probe), "train", "--out", str(tmp_path / "run"), "--quiet",
            *[x for kv in sets for x in ("--set", kv)]]
    probes = tmp_path / "probes"
    probes.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", PROBE_DIR=str(probes))
    env.pop("STEPLM_FAULT", None)
    if fault:
        env["STEPLM_FAULT"] = fault
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)
    lines = sorted(p.read_text() for p in probes.iterdir())
    assert lines == [f"rank 0 rc {rc} left 0", f"rank 1 rc {rc} left 0"], (res.stdout[-2000:], res.stderr[-3000:])
