"""What a run prints while it trains, on stderr. On a terminal: a tqdm bar, with evaluations, growth
and checkpoints written above it. Elsewhere (a log file, a pipe, a scheduler's output): one plain
line per metrics row (every train.log_every steps), evaluation, growth and checkpoint, so a log
reads like nanoGPT's or torchtitan's. ``quiet``: nothing (errors, warnings and the final JSON still
print). The lines are made from the metrics rows, so the log and metrics.jsonl say the same."""
from __future__ import annotations

import math
import sys

from steplm.eval.loss import perplexity_of


def _num(value, spec: str) -> str:
    """A number as ``spec``, or as it is when a metrics row holds it as text ("nan", "inf")."""
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def clock(seconds: float) -> str:
    """Seconds as h:mm:ss."""
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def size(n_bytes: int) -> str:
    """Bytes in MiB below a GiB, else in GiB."""
    return f"{n_bytes / 2**20:.1f} MiB" if n_bytes < 2**30 else f"{n_bytes / 2**30:.2f} GiB"


def step_line(row: dict, total: int, stage: str) -> str:
    """A metrics row of a training step: 'step 10/64 | stage 1 of 2 | loss 6.2345 | lr 3.000e-03 |
    grad norm 1.23 | 12,345 tok/s | elapsed 0:00:12' (then the peak memory and the skipped count
    when there are)."""
    parts = [f"step {row['step']}/{total}", stage, f"loss {_num(row['loss'], '.4f')}", f"lr {row['lr']:.3e}",
             f"grad norm {_num(row['grad_norm'], '.3g')}", f"{row['tok_per_s']:,.0f} tok/s",
             f"elapsed {clock(row['elapsed_s'])}"]
    if row.get("memory"):
        parts.append(f"peak {size(row['memory'])}")
    if row.get("skipped"):
        parts.append(f"skipped {row['skipped']}")
    return " | ".join(parts)


def eval_line(step: int, total: int, stage: str, val_loss: float, split: str = "val") -> str:
    """'step 50/64 | stage 1 of 2 | val loss 5.4321 | val ppl 228.10' (``split`` 'train' for a loss
    on training examples, SFT's)."""
    ppl = perplexity_of(val_loss)
    return f"step {step}/{total} | {stage} | {split} loss {val_loss:.4f} | {split} ppl {ppl:.2f}" + \
        ("" if math.isfinite(ppl) else " (overflow)")


def growth_line(prev, stage, name: str) -> str:
    """The change from stage ``prev`` to ``stage`` (``plan.stages.Stage``s), as `steplm plan` counts
    them: 'stage 2 of 2: 3 -> 6 layers (3 new; 3 frozen with rank-8 adapters), 701,184 trainable
    layer parameters'."""
    frozen = stage.layers - stage.new_layers if stage.kind != "full" else 0
    held = f"{frozen} frozen" + (f" with rank-{stage.lora_rank} adapters" if stage.lora_rank else "")
    depth = (f"{prev.layers} -> {stage.layers} layers ({stage.new_layers} new; {held})"
             if stage.layers != prev.layers else f"{stage.layers} layers ({held})")
    return f"{name}: {depth}, {stage.trainable_params:,} trainable layer parameters"


class Console:
    """The run's live output: ``mode`` 'bar', 'lines' or 'quiet' (``pick``)."""

    def __init__(self, mode: str, total: int, initial: int):
        self.mode, self.total, self.bar = mode, total, None
        if mode == "bar":
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)

    @staticmethod
    def pick(progress: bool, stream=None) -> str:
        """'quiet' without progress, else 'bar' on a terminal and 'lines' anywhere else."""
        stream = stream or sys.stderr
        if not progress:
            return "quiet"
        return "bar" if hasattr(stream, "isatty") and stream.isatty() else "lines"

    def say(self, text: str) -> None:
        """One line (an evaluation, a growth, a checkpoint): above the bar, or as it is."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        elif self.mode == "lines":
            print(text, file=sys.stderr, flush=True)

    def row(self, row: dict, stage: str) -> None:
        """A training step's metrics row: the bar's postfix, or a line."""
        if self.bar is not None:
            self.bar.set_postfix(stage=row["stage"], loss=_num(row["loss"], ".3f"), tok_s=f"{row['tok_per_s']:,.0f}")
        elif self.mode == "lines":
            self.say(step_line(row, self.total, stage))

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
