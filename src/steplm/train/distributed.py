"""Process-group set-up for torchrun (DDP / FSDP2): gloo on CPU, NCCL on CUDA."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init(device: torch.device) -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun with several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def mean(value: float) -> float:
    """The mean of a Python float over ranks (itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
