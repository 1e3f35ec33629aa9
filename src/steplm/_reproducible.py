"""Run-to-run reproducibility of Intel MKL, set before torch first calls it (no torch import here).

Outside its Conditional Numerical Reproducibility (CNR) mode, MKL may schedule a GEMM's work over its
threads dynamically, reduce partial sums in whatever order the threads finish, and size its blocks from
the caches it detects, so the same call on the same numbers can round differently from one process to
the next (oneMKL Developer Guide, "Reproducibility Conditions" and "Named Constants for CNR Control").
``MKL_CBWR=AUTO`` keeps the code path MKL would pick for this CPU (AVX-512 here, no slower branch such
as ``COMPATIBLE``'s SSE2) and fixes the rest: static scheduling, deterministic reductions, fixed cache
sizes. MKL reads the variable at its first call, not when the library loads, so setting it while
``import steplm`` runs is in time unless the process already ran a float32 matmul; child processes
(torchrun's ranks, the test suite's subprocesses) inherit it.

``STRICT`` is not added: it makes only ?gemm independent of the thread count, and the rest of a train
step (torch's own reductions, oneDNN's bf16 matmuls) is not, so it would cost speed without making a
run reproducible across thread counts (docs/reliability.md, Reproducibility)."""
from __future__ import annotations

import os

MKL_CNR_BRANCH = "AUTO"


def pin_mkl_branch(environ=os.environ) -> str:
    """Set ``MKL_CBWR`` to ``AUTO`` unless the user set it (their value is kept, whatever it is);
    returns the value in force. MKL reads a value it does not know as ``AUTO``; only an empty
    ``MKL_CBWR=`` leaves CNR off, as without steplm (``tests/test_determinism.py`` asks MKL).
    Process-wide and inherited by child processes; no effect on GPUs or where torch is not built
    with MKL."""
    return environ.setdefault("MKL_CBWR", MKL_CNR_BRANCH)
