"""Fault injection for the reliability tests, from the environment: STEPLM_FAULT=<point>:<step>.

The trainer knows nothing of it: ``install`` adds hooks to a trainer's hook lists when the variable
is set. Points: ``kill_after_step:N`` (SIGKILL once step N is done and checkpointed),
``sigterm_after_step:N`` / ``sigusr1_after_step:N`` (that real signal after step N),
``sigterm_mid_step:N`` / ``sigusr1_mid_step:N`` (after the first micro-batch of step N),
``nan_at_step:N`` (step N's loss reads as NaN); and, in ``checkpoint.save``,
``kill_in_checkpoint:N`` and ``enospc_in_checkpoint:N``.
"""
from __future__ import annotations

import errno
import os
import signal


def active(point: str, step: int) -> bool:
    """Whether STEPLM_FAULT names ``point`` at ``step``."""
    return os.environ.get("STEPLM_FAULT", "") == f"{point}:{step}"


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
    trainer.hooks["step_loss"].append(lambda t, loss: float("nan") if active("nan_at_step", t.step + 1) else loss)
    trainer.hooks["checkpoint_end"].append(lambda t: t.main and crash("kill_after_step", t.step))
    trainer.hooks["step_end"].append(lambda t: send_signal(t.step, "after_step"))
