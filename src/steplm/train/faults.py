"""Fault injection for the reliability tests, from the environment: STEPLM_FAULT=<point>:<step>.

The trainer knows nothing of it: ``install`` adds hooks to a trainer's hook lists when the variable
is set. Points: ``kill_after_step:N`` (SIGKILL once step N is done and checkpointed),
``sigterm_after_step:N`` / ``sigusr1_after_step:N`` (that real signal after step N),
``sigterm_mid_step:N`` / ``sigusr1_mid_step:N`` (after the first micro-batch of step N),
``nan_at_step:N`` (step N's loss reads as NaN), ``nan_every:K`` (so does that of every K-th step),
``raise_after_step:N`` (a RuntimeError once step N is done: a bug in the middle of a run); and, in
``checkpoint.save``, ``kill_in_checkpoint:N`` and ``enospc_in_checkpoint:N``.
"""
from __future__ import annotations

import errno
import os
import signal


def active(point: str, step: int) -> bool:
    """Whether STEPLM_FAULT names ``point`` at ``step``."""
    return os.environ.get("STEPLM_FAULT", "") == f"{point}:{step}"


def every(point: str, step: int) -> bool:
    """Whether STEPLM_FAULT is ``point:K`` with ``step`` a multiple of K."""
    name, _, k = os.environ.get("STEPLM_FAULT", "").partition(":")
    return name == point and k.isdigit() and int(k) > 0 and step % int(k) == 0


def nan_loss(trainer, loss: float) -> float:
    """The step's loss, or NaN at ``nan_at_step:N`` / ``nan_every:K``."""
    step = trainer.step + 1
    return float("nan") if active("nan_at_step", step) or every("nan_every", step) else loss


def raise_error(step: int) -> None:
    """A RuntimeError at ``raise_after_step:N``."""
    if active("raise_after_step", step):
        raise RuntimeError(f"injected fault after step {step}")


def crash(point: str, step: int) -> None:
    """At an injected point: a real SIGKILL of this process, or an ENOSPC (for ``enospc_*`` points)."""
    if active(point, step):
        if point.startswith("enospc"):
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        os.kill(os.getpid(), signal.SIGKILL)


def send_signal(step: int, when: str) -> None:
    """SIGTERM or SIGUSR1 to this process at ``sigterm_<when>:N`` / ``sigusr1_<when>:N``."""
    for point, sig in ((f"sigterm_{when}", signal.SIGTERM), (f"sigusr1_{when}", signal.SIGUSR1)):
        if active(point, step):
            os.kill(os.getpid(), sig)


def install(trainer) -> None:
    """Add the injected faults to ``trainer``'s hooks (nothing when STEPLM_FAULT is unset)."""
    if not os.environ.get("STEPLM_FAULT"):
        return
    trainer.hooks["micro_batch_end"].append(lambda t: send_signal(t.step + 1, "mid_step"))
    trainer.hooks["step_loss"].append(nan_loss)
    trainer.hooks["checkpoint_end"].append(lambda t: t.main and crash("kill_after_step", t.step))
    trainer.hooks["step_end"].append(lambda t: send_signal(t.step, "after_step"))
    trainer.hooks["step_end"].append(lambda t: raise_error(t.step))
