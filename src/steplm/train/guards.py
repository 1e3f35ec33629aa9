"""What keeps a run directory trustworthy: one writer at a time, a graceful stop on preemption
signals, finite weights, and strict JSON in everything the run writes.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import signal
import threading
import time
from pathlib import Path

from steplm.errors import UserError

LOCK_NAME = ".lock"
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class RunDirInUse(UserError):
    """Another live process holds the run directory's lock."""


def check_run_dir(out: str | Path, flag: str = "--out") -> None:
    """Refuse a run directory that a new run or a resume would clobber: a file, a finished run (its
    ``summary.json`` written), or a non-empty directory that holds no run (no ``config.yaml``: an HF
    export, another tool's files). A missing or empty directory starts a run; one with a run's
    ``config.yaml`` and no summary resumes it. Raises UserError naming ``flag``; writes nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag}: {out} is a file, not a directory; choose another directory")
    if not out.is_dir():
        return
    try:
        names = {p.name for p in out.iterdir()} - {LOCK_NAME}
    except OSError as e:
        raise UserError(f"{flag}: cannot read {out} ({e.strerror})")
    if not names:
        return
    if (out / "summary.json").is_file():
        raise UserError(f"{flag}: {out} holds a finished run (summary.json); choose another directory, or delete "
                        f"it to train again")
    if not (out / "config.yaml").is_file():
        raise UserError(f"{flag}: {out} is not empty and holds no run to resume; choose another directory")


class RunLock:
    """An exclusive ``flock`` on ``RUN_DIR/.lock``, held while the run writes there.

    The kernel drops a flock when its process dies, however it dies, so a killed run never leaves a
    lock that blocks the next one: the next run simply takes it over. The file holds the holder's
    pid, for the message, and is emptied on a clean release; a pid found in it at acquisition is
    that of a run that died holding the lock (``stale_pid``). The file is never deleted, since
    deleting a flocked file lets two processes lock two different files of the same name.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise UserError(f"--out: cannot write to {run_dir} ({e.strerror})")
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            os.close(self.fd)
            self.fd = None
            raise RunDirInUse(f"--out: {run_dir} is in use by another steplm train (pid {holder}); wait for it "
                              f"to finish or choose another directory")
        previous = os.pread(self.fd, 32, 0).decode(errors="replace").strip()
        self.stale_pid = int(previous) if previous.isdigit() and int(previous) != os.getpid() else None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def _holder(self, wait_s: float = 2.0) -> str:
        """The pid in the lock file. The holder writes it just after taking the lock, so a run
        started at the same moment may find the file still empty: it looks again for up to
        ``wait_s`` seconds before calling the holder unknown."""
        deadline = time.monotonic() + wait_s
        while True:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip()
            if holder.isdigit() or time.monotonic() >= deadline:
                return holder or "unknown"
            time.sleep(0.01)

    def release(self):
        """Empty the file and drop the lock (idempotent)."""
        if getattr(self, "fd", None) is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    __del__ = release


class StepAbandoned(Exception):
    """A preemption signal arrived between two micro-batches of one optimizer step: the trainer drops
    the step's partial gradients, rewinds its data position to the step's start and checkpoints."""


class Preemption:
    """While active, SIGTERM and SIGUSR1 (what SLURM and other schedulers send before a kill) only
    record themselves; the trainer asks ``requested`` between optimizer steps (and, in one process,
    between micro-batches), checkpoints and exits. Outside the main thread (where Python cannot
    install handlers) it does nothing."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for s in PREEMPTION_SIGNALS:
                self._previous[s] = signal.signal(s, self._record)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _record(self, signum, frame):
        self.signum = signum

    def requested(self, world: int = 1) -> bool:
        """Whether a preemption signal arrived (on any rank: a collective when ``world`` > 1)."""
        if world <= 1:
            return self.signum is not None
        from steplm.train import distributed
        return distributed.mean(float(self.signum is not None)) > 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal"


def all_finite(tensors) -> bool:
    """Whether every element of every tensor is finite. One fused max-|x| reduction over all of them
    (``torch._foreach_norm`` with ord inf, which NaN propagates through and which cannot overflow)
    and one host sync. Sharded (DTensor) parameters are checked on their local shard."""
    import torch

    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    local = [t.detach() for t in local if t.numel()]
    if not local:
        return True
    by_device: dict = {}
    for t in local:
        by_device.setdefault(t.device, []).append(t)
    flags = [torch.stack([n.float() for n in torch._foreach_norm(ts, math.inf)]).isfinite().all().cpu()
             for ts in by_device.values()]
    return bool(torch.stack(flags).all())


def finite_or_text(obj):
    """``obj`` with every non-finite float replaced by its text ("nan", "inf", "-inf"), recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: finite_or_text(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_text(v) for v in obj]
    return obj


def dumps(obj, **kwargs) -> str:
    """Strict JSON (no bare NaN/Infinity): non-finite floats are written as strings."""
    return json.dumps(finite_or_text(obj), allow_nan=False, **kwargs)
