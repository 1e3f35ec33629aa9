"""The learning-rate schedule: linear warmup, then a cosine to train.min_lr_ratio of the peak. STEP
restarts it at every stage (rewarming to the stage-1 peak); the other methods follow one cosine over
the run. In stages whose adapters ReLoRA resets, a restart ramp (jagged cosine) multiplies it.

The ends of a schedule of N steps (0-based positions 0..N-1) with W = train.warmup_steps:
positions 0..W-1 warm up linearly, (s+1)/W of train.lr, so the peak is reached on position W-1
(position 0 without warmup) and used there once; the cosine runs from that peak to
train.min_lr_ratio · train.lr, reached on position N-1, the schedule's last step. N is the
schedule's nominal length (``Stage.schedule_steps``): the run's length for one cosine, the stage's
for STEP's last stage. STEP's earlier stages are cut at step.growth_fraction of theirs: a cut
stage's last step is position ``Stage.steps - 1``, before the floor, so its lr ends above it. A
schedule of no more steps than its warmup never decays (``plan.stages`` warns about it)."""
from __future__ import annotations

import math

from steplm.methods.base import restart_ramp


def lr_at(cfg, stage, step_in_stage: int, step: int) -> float:
    """The lr (before ``lr_scale``) at ``step_in_stage`` of ``stage`` (a plan Stage), global ``step``:
    train.lr on the warmup's last step, train.min_lr_ratio · train.lr on the schedule's last step."""
    t = cfg.train
    s = step_in_stage if stage.schedule_restarts else step  # position in the schedule
    peak = max(t.warmup_steps, 1) - 1  # the warmup's last position, at train.lr
    if s < peak:
        lr = t.lr * (s + 1) / t.warmup_steps
    else:
        decay = stage.schedule_steps - 1 - peak  # positions from the peak to the schedule's last one
        progress = min(1.0, (s - peak) / max(1, decay))
        lr = t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    if stage.adapter_resets and cfg.lora.relora_warmup and step_in_stage >= stage.restart_ramp_from:
        lr *= restart_ramp(cfg, step_in_stage)
    return lr
