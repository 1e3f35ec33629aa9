"""What a run measures and records as it goes: metrics.jsonl rows (and TensorBoard scalars), the
model-state bytes of live tensors, the CPU peak of a step, and the hash of the final weights."""
from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path

import torch

from steplm.errors import UserError
from steplm.io.files import dumps
from steplm.train import guards


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


# ---------------------------------------------------------------------------- the rows of a run
def rounded(x: float, digits: int, significant: bool = False) -> float | str:
    """``x`` rounded for a metrics row (to ``digits`` decimals, or significant digits); a non-finite
    value as the string "nan", "inf" or "-inf" (metrics.jsonl is strict JSON)."""
    if not math.isfinite(x):
        return str(x)
    return float(f"{x:.{digits}g}") if significant else round(x, digits)


def elapsed_seconds(run) -> float:
    """Wall seconds the run has trained, over all its processes (a resume goes on from its
    checkpoint's count)."""
    origin = getattr(run, "wall_origin", None)
    return run.state.elapsed_seconds if origin is None else time.perf_counter() - origin


def stage_peak_bytes(run) -> int | None:
    """The tracked peak of the stage so far: on a GPU max_memory_allocated since the stage began;
    on the CPU the MemTracker peak of the stage's measured step (None before it, or where none is
    measured: compile, several processes)."""
    if run.device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return run.state.record.get("peak_bytes") if run.state.record else None


def step_row(run, loss: float, tokens: int, seconds: float) -> dict:
    """The metrics row of the step just taken (stages 1-based, as `steplm plan` numbers them):
    ``tokens`` trained over the last ``seconds`` give tok_per_s; memory is the stage's peak bytes."""
    s = run.state
    return {"step": s.step, "stage": s.stage + 1, "loss": rounded(loss, 5),
            "lr": run.optimizer.param_groups[0]["lr"], "grad_norm": rounded(run.grad_norm, 6, significant=True),
            "tokens": s.tokens, "flops": s.flops[run.cfg.step.flops_convention], "skipped": s.skipped,
            "tok_per_s": round(tokens / max(seconds, 1e-9), 1), "elapsed_s": round(elapsed_seconds(run), 3),
            "memory": stage_peak_bytes(run)}


def eval_row(run, loss: float) -> dict:
    """The metrics row of an evaluation loss (nats) at this step, under the task's key (val_loss;
    SFT's train_loss)."""
    s = run.state
    return {"step": s.step, "stage": s.stage + 1, run.task.eval_key: rounded(loss, 5), "tokens": s.tokens,
            "flops": s.flops[run.cfg.step.flops_convention], "elapsed_s": round(elapsed_seconds(run), 3)}


def stage_record(run, measured: dict) -> dict:
    """The memory record of the current stage (summary.json's "stages"): its shape, planned and
    measured model-state bytes (``measured``: ``state_bytes``), the peak filled in later."""
    st = run.current_stage
    return {"stage": run.stage + 1, "layers": st.layers, "new_layers": st.new_layers,
            "trainable_params": st.trainable_params, "frozen_params": st.frozen_params,
            "lora_params": st.lora_params, "planned_state_bytes": dict(st.planned_state_bytes),
            "measured_state_bytes": {"layers": measured["layers"], "total": measured["total"]},
            "optimizer_step_counter_bytes": measured["optimizer_step_counters"],
            "peak_bytes": None, "peak_source": "cuda.max_memory_allocated" if run.device.type == "cuda"
            else "MemTracker (tracked tensor bytes)"}


def measured_step(run) -> tuple[float, bool]:
    """``run.train_step()``: (loss in nats, applied); on CPU, at the stage's second step, under the
    MemTracker (the stage's peak bytes, in its record). The stage's memory record is made after its
    first applied step. A step abandoned on preemption ends the run with its checkpoint."""
    s, n_steps = run.state, run.stage_steps[run.state.stage]
    measure = (s.step_in_stage == min(1, n_steps - 1) and run.device.type == "cpu"
               and not run.cfg.train.compile and run.world == 1)
    try:
        if measure:
            box = {}
            peak = cpu_peak_step(lambda: box.setdefault("out", run.train_step()), run.model, run.optimizer, run)
            loss, ok = box["out"]
        else:
            (loss, ok), peak = run.train_step(), None
    except guards.StepAbandoned:
        run._stop_for_preemption()  # the checkpoint of the last whole step
    if s.record is None and ok:  # after the stage's first optimizer step
        s.record = stage_record(run, state_bytes(run.model, run.optimizer))
        s.record["_seconds_at_start"] = s.step_seconds
    if measure and s.record is not None:
        s.record["peak_bytes"] = peak
    return loss, ok
