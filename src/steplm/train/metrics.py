"""What a run measures and records as it goes: metrics.jsonl rows (and TensorBoard scalars), the
model-state bytes of live tensors, the CPU peak of a step, and the hash of the final weights."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from steplm.errors import UserError
from steplm.io.files import dumps


def require_tensorboard() -> None:
    """Refuse train.tensorboard without the tensorboard package (UserError), before a run writes anything."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UserError("train.tensorboard: needs the tensorboard package (pip install tensorboard)")


class MetricsLog:
    """metrics.jsonl of a run directory, one JSON object a line (and TensorBoard event files with
    ``tensorboard``). A resumed run cuts the file back to ``resume_bytes``, its length at the
    checkpoint, so rows written after that checkpoint are not repeated."""

    def __init__(self, out: Path, resume_bytes: int | None = None, tensorboard: bool = False):
        path = out / "metrics.jsonl"
        if resume_bytes is not None and path.exists():
            os.truncate(path, resume_bytes)
        elif resume_bytes is None:
            path.write_text("")
        self.file = open(path, "a")
        self.board = None
        if tensorboard:
            require_tensorboard()
            from torch.utils.tensorboard import SummaryWriter
            self.board = SummaryWriter(str(out / "tensorboard"))

    def write(self, row: dict) -> None:
        self.file.write(dumps(row) + "\n")
        self.file.flush()
        if self.board is not None:
            for k, v in row.items():
                if k not in ("step", "stage") and isinstance(v, (int, float)):
                    self.board.add_scalar(k, v, row["step"])

    def tell(self) -> int:
        """Bytes written so far (what a checkpoint records)."""
        return self.file.tell()

    def close(self) -> None:
        self.file.close()
        if self.board is not None:
            self.board.close()


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds: for a tensor subclass (torchao's quantized optimizer states) the
    sum over its inner tensors (codes, block scales, lookup table), not numel × nominal dtype."""
    if hasattr(t, "__tensor_flatten__") and not _is_dtensor(t):  # FSDP2's DTensor: its global size, as before
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(x) for x in (getattr(t, n) for n in names) if torch.is_tensor(x))
    return t.numel() * t.element_size()


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Bytes held by parameters, gradients and per-element optimizer state (Adam moments), from the
    live tensors, split into transformer layers and the rest. Adam's 0-d step counters are reported
    apart (``optimizer_step_counters``) because the paper's 16 B/param model has no term for them."""
    layers = total = counters = 0
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        b = p.numel() * p.element_size()
        if p.grad is not None:
            b += p.grad.numel() * p.grad.element_size()
        for t in optimizer.state.get(p, {}).values():
            if hasattr(t, "ortho_matrix"):  # a GaLore projector holds its projection matrix (or two)
                mats = t.ortho_matrix if isinstance(t.ortho_matrix, (list, tuple)) else [t.ortho_matrix]
                b += sum(m.numel() * m.element_size() for m in mats if m is not None)
            elif torch.is_tensor(t):
                if t.dim() == 0:
                    counters += t.numel() * t.element_size()
                else:
                    b += _tensor_bytes(t)
        total += b
        if name.startswith("model.layers."):
            layers += b
    return {"layers": layers, "total": total, "optimizer_step_counters": counters}


def cpu_peak_step(step_fn, model, optimizer, trainer=None) -> int | None:
    """Peak tracked tensor bytes during one step on CPU (torch's MemTracker), or None if unsupported.
    With ``trainer``, its micro-batch hook resets the per-module stats between micro-batches."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:
        return None

    class Tracker(MemTracker):
        # MemTracker hooks every parameter's gradient to label it, which fails on frozen ones; the
        # hooks only label, every allocation is still counted in the total.
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

        # After every op MemTracker also updates each tracked module's own peak, a walk over all
        # modules: 3-4x the step's tracked time at 12 layers. Only the global peak is read here,
        # so the library's update runs with no modules to walk; the total it tracks is unchanged.
        def _update_peak_stats(self, peak_state):
            modules, self.memory_tracking = self.memory_tracking, {}
            try:
                super()._update_peak_stats(peak_state)
            finally:
                self.memory_tracking = modules

    tracker = Tracker()
    tracker.track_external(model, optimizer)
    hook = lambda t: tracker.reset_mod_stats()  # noqa: E731 - one forward per micro-batch, same global peak
    if trainer is not None:
        trainer.hooks["micro_batch_end"].append(hook)
    try:
        with tracker:
            step_fn()
    finally:
        if trainer is not None:
            trainer.hooks["micro_batch_end"].remove(hook)
    peak = tracker.get_tracker_snapshot("peak")
    return int(next(iter(peak.values()))["Total"]) if peak else None
