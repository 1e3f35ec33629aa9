"""torchrun on CPU (gloo, 2 processes): a 2-stage STEP run under DDP ends with the weights of a
single-process run with the same global batch."""
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, tiny_overrides

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(tmp_path, out, nproc, micro_batch, **extra):
    sets = tiny_overrides(tmp_path, **{"method": "step", "step.n_stages": 2, "step.layers_per_stage": "[2,2]",
                                       "train.max_steps": 8, "train.micro_batch": micro_batch,
                                       "train.checkpoint_every": 4}, **extra)
    args = ["-m", "steplm", "train", "--out", str(out), "--quiet", *[x for kv in sets for x in ("--set", kv)]]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("parallel", ["ddp"])
def test_two_processes_match_one(tmp_path, parallel):
    single = train(tmp_path, tmp_path / "single", 1, 4)
    multi = train(tmp_path, tmp_path / parallel, 2, 2, **{"train.parallel": parallel})
    assert single.keys() == multi.keys()
    worst = max((single[k] - multi[k]).abs().max().item() for k in single)
    assert worst < 1e-5, worst
    import json
    rows = [json.loads(x) for x in (tmp_path / parallel / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == {0, 1}  # the distributed run grew (and re-wrapped) once
    assert len([r for r in rows if "loss" in r]) == 8  # rank 0 alone wrote the log
