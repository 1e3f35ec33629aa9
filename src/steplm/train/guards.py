"""What keeps a run directory trustworthy: one writer at a time, a graceful stop on preemption
signals, finite weights, and strict JSON in everything the run writes.
"""
from __future__ import annotations

import fcntl
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

from steplm.errors import UserError

LOCK_NAME = ".lock"
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class RunDirInUse(UserError):
    """Another live process holds the run directory's lock."""


def check_run_dir(out: str | Path) -> None:
    """Refuse a run directory that a new run or a resume would clobber: a file, a finished run (its
    ``summary.json`` written), or a non-empty directory that holds no run (no ``config.yaml``: an HF
    export, another tool's files). A missing or empty directory starts a run; one with a run's
    ``config.yaml`` and no summary resumes it. Raises UserError keyed ``--out``; writes nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a directory; choose another directory", key="--out")
    if not out.is_dir():
        return
    try:
        names = {p.name for p in out.iterdir()} - {LOCK_NAME}
    except OSError as e:
        raise UserError(f"cannot read {out} ({e.strerror})", key="--out")
    if not names:
        return
    if (out / "summary.json").is_file():
        raise UserError(f"{out} holds a finished run (summary.json); choose another directory, or delete it to "
                        f"train again", key="--out")
    if not (out / "config.yaml").is_file():
        raise UserError(f"{out} is not empty and holds no run to resume; choose another directory", key="--out")


def holds_run_files(out: Path) -> bool:
    """Whether a run directory holds anything but its lock: once it does (config.yaml, metrics.jsonl,
    checkpoints), the run has started and its folder is never removed, however the run ends."""
    try:
        return any(p.name != LOCK_NAME for p in Path(out).iterdir())
    except OSError:  # gone, or not a directory: nothing of the run's to keep
        return False


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
    """While active, SIGTERM and SIGUSR1 (what SLURM and other schedulers send before a kill) and
    SIGINT (Ctrl-C) only record themselves; the trainer asks ``requested`` between optimizer steps
    (and, in one process, between micro-batches), checkpoints and exits. A second SIGINT raises
    KeyboardInterrupt at once (Ctrl-C twice: stop now, without the checkpoint). With ``notify``, the
    first SIGINT says on stderr what will happen. Outside the main thread (where Python cannot
    install handlers) it does nothing."""

    def __init__(self, notify: bool = False):
        self.signum: int | None = None
        self.notify = notify
        self.sigints = 0
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
        self.signum = self.signum or signum  # the first signal names the stop
        if signum != signal.SIGINT:
            return
        self.sigints += 1
        if self.sigints > 1:
            raise KeyboardInterrupt
        if self.notify:  # os.write: print() is not reentrant in a handler
            os.write(2, b"\nsteplm: interrupted: stopping after this step to write a checkpoint "
                        b"(Ctrl-C again stops at once, without it)\n")

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


def take_run_dir(out: Path, progress: bool) -> RunLock:
    """Create the run directory and take its lock (one writer per directory; a dead holder's lock
    is taken over). Creating the lock file doubles as the write test. A finished run or a foreign
    non-empty directory is refused before anything is written there."""

    check_run_dir(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out: cannot write to {out} ({e.strerror})")
    lock = RunLock(out)
    if lock.stale_pid and progress:
        print(f"steplm: taking over {out} from pid {lock.stale_pid}, which died holding it", file=sys.stderr)
    return lock


# -- what a run's numbers must be ------------------------------------------------------------------
DIVERGED_NATS = 1.0
"""A final val loss this far above ln(vocab_size) (a uniform guess) stops the run: it diverged."""
LEARNED_NATS = 0.1
"""A final val loss less than this far below ln(vocab_size) warns: the model learned (almost) nothing.
A fresh model scores ln(vocab_size) plus or minus a few hundredths; one that learned only the token
frequencies of English text is already about ln(vocab_size) - 1 (unigram entropy), so 0.1 separates
the two with room."""


def lower_hint(run) -> str:
    """What to change when steps keep failing: lower the lr; with adapters in the model their scale;
    an init_std far above the default's 0.02, whose logits start huge; and, where they are off,
    gradient clipping and the warmup."""
    from steplm.passes.lora import LoRALinear

    t = run.cfg.train
    hint = f"lower {run.task.lr_key}"
    if any(isinstance(m, LoRALinear) for m in run.model.modules()):
        lo = run.cfg.lora
        hint += (f", or lora.alpha (the adapters scale their update by lora.alpha / lora.rank = "
                 f"{lo.alpha / lo.rank:.3g})")
    if run.cfg.model.init_std > 0.2 and run.task.flags_init_std:
        hint += f", or model.init_std ({run.cfg.model.init_std:g}; the default is 0.02)"
    if t.grad_clip == 0:
        hint += ", or clip the gradients (train.grad_clip is 0, no clipping; 1.0 is usual)"
    if t.warmup_steps == 0:
        hint += f", or warm up ({run.task.warmup_key} is 0: the first step takes the peak lr)"
    return hint


def kept(run) -> str:
    """What a stopped run leaves to resume from: its newest checkpoint, or nothing."""
    from steplm.train.checkpoint import list_steps

    steps = list_steps(run.out / "checkpoints")
    if steps:
        return f"the last good checkpoint (step {steps[-1]}) is kept"
    return f"there is no checkpoint to resume from ({run.task.checkpoint_key} keeps them)"


SKIPPED_IN_ROW_LIMIT = 3
"""More than this many steps in a row skipped as bad batches stop the run: a rare bad batch is noise,
four in a row mean the model no longer trains (an lr or a weight has gone wrong)."""
MAJORITY_AFTER_STEPS = 8
"""From this many steps on, a run that has skipped more than half of its steps stops."""


def bad_batch(run, loss: float, grad_norm: float) -> bool:
    """Whether a step's loss or gradient norm is non-finite (or above train.max_grad_norm): then the
    step is skipped and counted (``check_training`` judges the count once the step's metrics row is
    written). Raises TrainingStopped with train.on_nonfinite stop, or past train.max_skipped skipped."""
    from steplm.errors import TrainingStopped

    t, s = run.cfg.train, run.state
    if math.isfinite(loss) and math.isfinite(grad_norm) and not (t.max_grad_norm and grad_norm > t.max_grad_norm):
        s.skipped_in_row = 0
        return False
    what = f"loss {loss:.4g}, gradient norm {grad_norm:.4g}"
    if t.on_nonfinite == "stop":
        raise TrainingStopped(f"step {run.step + 1}: bad batch ({what}); stopped, {kept(run)} "
                              f"(set train.on_nonfinite=skip to skip such batches)")
    s.skipped += 1
    s.skipped_in_row += 1
    if s.skipped > t.max_skipped:
        raise TrainingStopped(f"step {run.step + 1}: {s.skipped} bad batches skipped, more than "
                              f"train.max_skipped ({t.max_skipped}); {lower_hint(run)}")
    return True


def check_training(run, loss: float, grad_norm: float) -> None:
    """After a skipped step (``run.step`` counts it): stop (TrainingStopped, exit 3) a run that is
    not training, one with more than SKIPPED_IN_ROW_LIMIT steps skipped in a row, or more than half
    of its steps skipped once MAJORITY_AFTER_STEPS have run; the message names the keys to change."""
    from steplm.errors import TrainingStopped

    s, done = run.state, run.step
    in_row = s.skipped_in_row > SKIPPED_IN_ROW_LIMIT
    if in_row or (done >= MAJORITY_AFTER_STEPS and 2 * s.skipped > done):
        count = f"{s.skipped_in_row} steps in a row" if in_row else f"{s.skipped} of its {done} steps"
        raise TrainingStopped(f"{run.stage_name()}, step {done}: {count} were skipped as bad batches (the last: "
                              f"loss {loss:.4g}, gradient norm {grad_norm:.4g}), so the run is not training; "
                              f"{lower_hint(run)}; {kept(run)}")


def nonfinite(run, where: str):
    """The TrainingStopped of weights that hold NaN/inf."""
    from steplm.errors import TrainingStopped

    return TrainingStopped(f"step {run.step}: the weights are not finite (found at the {where}); {kept(run)} "
                           f"and no model was written ({lower_hint(run)})")


def check_weights_finite(run) -> None:
    """Stop (exit 3) as soon as a parameter holds NaN/inf: one fused on-device reduction and one
    host sync, at log steps only."""
    finite = all_finite(run.model.parameters())
    if run.world > 1:
        from steplm.train import distributed
        finite = distributed.mean(float(finite)) == 1.0
    if not finite:
        raise nonfinite(run, "log step")


def check_stage_loss(run, val: float) -> None:
    """A stage's evaluation loss (``run.task.eval_what``): non-finite, or at the end above a uniform
    guess, stops the run (the model diverged); at the end within LEARNED_NATS of a uniform guess, a
    warning."""

    from steplm.errors import TrainingStopped

    if not math.isfinite(val):  # finite weights whose logits overflow: a diverged model is not a result
        raise TrainingStopped(f"{run.stage_name()}: the {run.task.eval_what} is {val} (the model diverged); "
                              f"{kept(run)} and no model is written ({lower_hint(run)})")
    last = run.stage == len(run.stage_steps) - 1
    uniform = math.log(run.cfg.model.vocab_size)  # the loss of a uniform guess, about where training starts
    if last and val > uniform + DIVERGED_NATS:
        raise TrainingStopped(f"{run.stage_name()}: the final {run.task.eval_what} {val:.4g} nats is above "
                              f"ln(vocab_size) = {uniform:.4g}, the loss of a uniform guess (the model diverged); "
                              f"{kept(run)} and no model is written ({lower_hint(run)})")
    if last and val > uniform - LEARNED_NATS and run.main:
        skipped = (f"; {run.state.skipped} of its {sum(run.stage_steps)} steps were skipped as bad batches"
                   if run.state.skipped else "")
        print(f"steplm: warning: the final {run.task.eval_what} {val:.4g} nats is not {LEARNED_NATS} below "
              f"ln(vocab_size) = {uniform:.4g}, the loss of a uniform guess: the model learned nothing "
              f"(check {run.task.lr_key} and model.norm_eps, or train longer){skipped}", file=sys.stderr)


def pick_host_allocator(run) -> str:
    """Set up the CPU run's host allocator (train.host_allocator; 'auto' decides from the run's least
    step peak and the memory available now, and says so when it does not retain); returns it. The
    choice is made again when a run resumes."""
    from steplm.allocator import available_bytes, choose_host_allocator, retain_host_memory
    from steplm.plan.stages import minimum_peak_bytes

    peak = minimum_peak_bytes(run.cfg, run.plan, run.task.fit_activations)["total"]
    import steplm.allocator as allocator

    chosen, why = choose_host_allocator(run.cfg.train.host_allocator, peak, available_bytes())
    if chosen == "retain":
        retain_host_memory()
    elif allocator.RETAINED:  # an earlier trainer in this process retained: undo it (as near as glibc goes)
        retain_host_memory(False)
    if why and run.main:
        print(f"steplm: {why}", file=sys.stderr)
    return chosen


def check_fits(run) -> None:
    """Refuse a run whose lower bound on peak memory exceeds what the device can ever hold, before
    anything is allocated (a size like model.d_model=1e9 would otherwise end in an allocator's
    traceback): one line with the bound, its parts and the keys that set the largest part."""
    from steplm.devices import gib, require_memory
    from steplm.plan.stages import minimum_peak_bytes

    need = minimum_peak_bytes(run.cfg, run.plan, run.task.fit_activations)
    part = max(("states", "activations", "rope"), key=need.get)
    key = run.task.fit_keys[part]
    if part == "rope" and run.cfg.model.init_from:
        key += " (max_position_embeddings in model.init_from's config.json)"
    require_memory(need["total"], run.device, f"this run (model states {gib(need['states'])}, activations "
                   f"{gib(need['activations'])}, RoPE tables {gib(need['rope'])})", key)
