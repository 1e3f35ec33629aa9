"""One training step of a steplm Trainer, measured the same way on CPU and GPU (gpu.py and
paper_shapes.py both use this module):

- ``step(t)``: one optimizer step, its wall time in seconds (synchronised on CUDA);
- ``peak_step(t)``: one optimizer step under the device's peak tracker: peak bytes
  (``torch.cuda.max_memory_allocated`` since ``reset_peak`` on CUDA, torch's MemTracker over the
  step on CPU) and the live model-state bytes (``state_bytes``) with the gradients still held;
- ``trainer(...)``: a Trainer of a config fed uniform random token ids (memory and time do not
  depend on the text), so that no corpus is needed: a small generated text only sets up its data.
"""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from steplm import config  # noqa: E402
from steplm.train.loop import Trainer  # noqa: E402
from steplm.train.metrics import cpu_peak_step, state_bytes  # noqa: E402


class RandomTokens:
    """Stands in for the trainer's BatchSampler: (x, y) batches of uniform random token ids."""

    def __init__(self, vocab: int, batch: int, seq: int, seed: int = 0):
        self.vocab, self.batch, self.seq = vocab, batch, seq
        self.gen = torch.Generator().manual_seed(seed)

    def next(self):
        t = torch.randint(0, self.vocab, (self.batch, self.seq + 1), generator=self.gen)  # (B, T+1)
        return t[:, :-1], t[:, 1:]

    def state_dict(self) -> dict:  # the trainer rewinds a step abandoned on preemption
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict):
        self.gen.set_state(state["gen"])


def corpus(d: Path, name: str, seed: int) -> Path:
    """A small text file for the trainer's tokenizer and data set-up (its tokens are not trained on)."""
    words = ["the", "of", "memory", "stage", "layer", "growth", "token", "model", "adapter", "frozen"]
    rng = random.Random(seed)  # no torch op: paper_shapes.py calls this before it forks
    idx = [rng.randrange(len(words)) for _ in range(60_000)]
    text = "\n".join(" ".join(words[i] for i in idx[k:k + 12]) for k in range(0, len(idx), 12))
    f = d / name
    f.write_text(text)
    return f


def data_overrides(d: Path) -> dict:
    """--set items that point a config's data at two generated texts in ``d`` (written once) with a
    320-token BPE: the trainer's data set-up in about a second, whatever the model's vocabulary."""
    for name, seed in (("train.txt", 0), ("val.txt", 1)):
        if not (d / name).is_file():
            corpus(d, name, seed)
    return {"data.path": str(d / "train.txt"), "data.val_path": str(d / "val.txt"), "data.tokenizer": "bpe:320",
            "data.cache_dir": str(d / "cache")}


def trainer(path: str | Path | None, overrides: dict, out_dir: Path) -> Trainer:
    """A Trainer of config ``path`` (None: the defaults) with ``overrides`` (key: value, as --set),
    on random tokens."""
    cfg = config.load(path, [f"{k}={v}" for k, v in overrides.items()])
    t = Trainer(cfg, out_dir, progress=False)
    t.sampler = RandomTokens(cfg.model.vocab_size, cfg.train.micro_batch, cfg.train.seq_len, cfg.train.seed)
    return t


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device):
    """Start a new peak for ``peak_step`` on CUDA (nothing to do on CPU, where it tracks one step)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def _finish(t: Trainer):
    t.optimizer.zero_grad(set_to_none=True)
    t.account()


def step(t: Trainer) -> float:
    """One optimizer step of ``t``'s current stage (forward, backward, optimizer, zero_grad); seconds."""
    sync(t.device)
    t0 = time.perf_counter()
    t.train_step()
    _finish(t)
    sync(t.device)
    return time.perf_counter() - t0


def peak_step(t: Trainer) -> tuple[int | None, dict]:
    """One optimizer step of ``t``; returns (peak bytes, live model-state bytes). The peak is
    ``torch.cuda.max_memory_allocated`` since the last ``reset_peak`` on CUDA, MemTracker's peak of
    tracked tensor bytes over this step on CPU (None where MemTracker is missing). The live bytes
    (``state_bytes``: 'layers', 'total', 'optimizer_step_counters') are read after the optimizer
    step with the gradients still held, as the paper's 16 B/param counts them."""
    box = {}

    def run():
        t.train_step()
        box["live"] = state_bytes(t.model, t.optimizer)
    if t.device.type == "cuda":
        run()
        sync(t.device)
        peak = torch.cuda.max_memory_allocated(t.device)
    else:
        peak = cpu_peak_step(run, t.model, t.optimizer, t)
    _finish(t)
    return peak, box["live"]


def peak_source(device: torch.device) -> str:
    return "cuda.max_memory_allocated" if device.type == "cuda" else "MemTracker (tracked tensor bytes)"
