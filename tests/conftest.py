import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STEPLM_SHARED_DATA", ROOT.parent / "shared" / "data"))


def pytest_configure(config):
    """The default token cache (data.cache_dir unset: $STEPLM_CACHE_DIR) goes to a temporary folder,
    never to the user's ~/.cache.

    Under pytest-xdist (``make test`` runs -n auto) the workers share the cores: each worker, and
    each subprocess it starts (OMP_NUM_THREADS), gets its share of intra-op threads, so the
    workers' thread pools do not oversubscribe the machine."""
    if "STEPLM_CACHE_DIR" not in os.environ:  # set by the controller, inherited by the xdist workers
        import tempfile
        os.environ["STEPLM_CACHE_DIR"] = tempfile.mkdtemp(prefix="steplm-test-tokens-")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Run the long end-to-end tests (marked slow) first, in collection order otherwise: under
    pytest-xdist the short ones then fill the workers around them, instead of one long test
    starting last and leaving a worker idle while it runs alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def shared(rel: str) -> Path:
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"shared data {p} not present")
    return p


def tiny_overrides(tmp: Path, **extra) -> list[str]:
    """--set items for a seconds-long run on tiny Shakespeare with a trained 512-token BPE."""
    base = {
        "data.path": str(shared("shakespeare/input.txt")), "data.tokenizer": "bpe:512",
        "data.val_fraction": 0.5, "data.cache_dir": str(tmp / "cache"),
        "model.vocab_size": 512, "model.d_model": 32, "model.n_layers": 4, "model.n_heads": 2,
        "model.max_seq_len": 32, "train.seq_len": 32, "train.micro_batch": 4, "train.max_steps": 12,
        "train.warmup_steps": 2, "train.eval_every": 0, "train.eval_tokens": 1024, "train.log_every": 1,
        "train.dtype": "fp32", "lora.rank": 4,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def shakespeare_dir(tmp_path_factory):
    """Tiny Shakespeare split into documents (one file per 40-line chunk)."""
    text = shared("shakespeare/input.txt").read_text()
    lines = text.splitlines(keepends=True)
    d = tmp_path_factory.mktemp("shakes")
    for i in range(0, len(lines), 400):
        (d / f"part{i // 400:03d}.txt").write_text("".join(lines[i:i + 400]))
    return d


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, shakespeare_dir):
    """A finished tiny vanilla run directory."""
    from steplm import config
    from steplm.train.loop import Trainer

    tmp = tmp_path_factory.mktemp("tiny_run")
    cfg = config.load(None, tiny_overrides(tmp, **{"data.path": str(shakespeare_dir), "data.val_fraction": 0.2,
                                                     "model.max_seq_len": 256}))
    out = tmp / "run"
    Trainer(cfg, out, progress=False).fit()
    return out


def torchrun_args(nproc: int) -> list[str]:
    """``python -m torch.distributed.run`` arguments for nproc local processes on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={port}"]


@pytest.fixture(scope="session")
def step_run(tmp_path_factory, shakespeare_dir):
    """A finished tiny 2-stage STEP run (2 + 2 layers, LoRA on the frozen ones in stage 2) with a
    checkpoint every 4 steps and at its last step, all kept."""
    from steplm import config
    from steplm.train.loop import Trainer

    tmp = tmp_path_factory.mktemp("step_run")
    cfg = config.load(None, tiny_overrides(tmp, **{
        "data.path": str(shakespeare_dir), "data.val_fraction": 0.2, "model.max_seq_len": 256, "method": "step",
        "step.n_stages": 2, "step.layers_per_stage": "[2,2]", "train.checkpoint_every": 4,
        "train.keep_checkpoints": 10}))
    out = tmp / "run"
    Trainer(cfg, out, progress=False).fit()
    return out
