"""Where and in what precision a command runs: ``auto|cpu|cuda`` and ``auto|fp32|bf16``, the same meaning
for ``train.device``/``train.dtype`` and for the ``--device``/``--dtype`` flags of eval, generate, sft and
mt-bench.

bf16 is run as ``torch.autocast``: weights stay fp32 and matmuls run in bf16. That keeps one copy of the
weights whatever the dtype (so fp32 scores are always one flag away), lets SFT update fp32 master weights,
and keeps RMSNorm, softmax and the loss in fp32 as autocast does for training.
"""
from __future__ import annotations

import platform
from contextlib import nullcontext
from pathlib import Path

import torch

from steplm.errors import UserError

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "bf16")


def pick_device(name: str, key: str = "train.device") -> torch.device:
    """The torch device for ``name``; ``auto`` is the GPU when there is one. ``key`` names the flag in errors."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        fix = "--device cpu" if key.startswith("--") else f"{key}=cpu"
        raise UserError(f"cuda requested but no GPU is available; use {fix}", key=key)
    if name not in ("cpu", "cuda"):
        raise UserError(f"must be one of {', '.join(DEVICES)}, got {name!r}", key=key)
    return torch.device(name)


def memory_capacity_bytes(device: torch.device) -> int:
    """Memory one process can ever use on ``device`` (bytes): the GPU's total memory, or on the CPU the
    physical memory (less under a cgroup limit) plus swap."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import os
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            ram = min(ram, int(Path(limit).read_text().strip()))
        except (OSError, ValueError):  # absent, or "max"
            pass
    swap = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("SwapTotal:"):
                swap = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return ram + swap


def gib(n_bytes: float) -> str:
    """``n_bytes`` in GiB, three significant digits."""
    return f"{n_bytes / 2**30:.3g} GiB"


def require_memory(need_bytes: int, device: torch.device, what: str, key: str, fix: str | None = None):
    """Raise a one-line UserError, before any allocation, when ``need_bytes`` (a lower bound) exceeds
    ``memory_capacity_bytes(device)``, keyed ``key``: "<what> needs at least N GiB, more than the M GiB
    the <device> has; <fix>" (fix: "lower <key>" unless given)."""
    have = memory_capacity_bytes(device)
    if need_bytes > have:
        raise UserError(f"{what} needs at least {gib(need_bytes)}, more than the {gib(have)} the {device.type} "
                        f"has; {fix or 'lower ' + key}", key=key)


def check_model_fits(cfg, n_params: int, device, config_file, positions_key: str, key: str = "MODEL"):
    """Refuse to build a model of ``n_params`` fp32 parameters and ``cfg.max_seq_len`` RoPE positions
    that ``device`` cannot hold (a config.json with max_position_embeddings 2e9 asks for 477 GiB of
    RoPE tables), keyed ``key`` (the argument that gave the folder) and ``positions_key`` of
    ``config_file``."""
    from steplm.plan.memory import rope_table_bytes

    rope = rope_table_bytes(cfg.max_seq_len, cfg.head_dim)
    require_memory(4 * n_params + rope, torch.device(device),
                   f"the model ({gib(4 * n_params)} of fp32 weights, {gib(rope)} of RoPE tables for "
                   f"{cfg.max_seq_len:,} positions)", key,
                   f"lower {positions_key} in {config_file}" if rope > 4 * n_params else "use a device with more memory")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype for ``name``; ``auto`` is bf16 where the device runs it natively, else fp32."""
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """A bf16 autocast context on ``device``, or a no-op for fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (where its inputs must go)."""
    return next(model.parameters()).device


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what ``platform`` knows: benchmarks record it,
    as their ratios depend on it (AMX against AVX-512 changes the bf16 GEMM ceiling 5-fold)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
