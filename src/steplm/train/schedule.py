"""The learning-rate schedule: linear warmup, then a cosine to train.min_lr_ratio of the peak. STEP
restarts it at every stage (rewarming to the stage-1 peak); the other methods follow one cosine over
the run. In stages whose adapters ReLoRA resets, a restart ramp (jagged cosine) multiplies it."""
from __future__ import annotations

import math

from steplm.methods.base import restart_ramp


def lr_at(cfg, stage, step_in_stage: int, step: int) -> float:
    """The lr (before ``lr_scale``) at ``step_in_stage`` of ``stage`` (a plan Stage), global ``step``."""
    t = cfg.train
    s = step_in_stage if stage.schedule_restarts else step  # position in the schedule
    total = stage.schedule_steps
    if s < t.warmup_steps:
        lr = t.lr * (s + 1) / t.warmup_steps
    else:
        progress = min(1.0, (s - t.warmup_steps) / max(1, total - t.warmup_steps))
        lr = t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    if stage.adapter_resets and cfg.lora.relora_warmup and step_in_stage >= stage.restart_ramp_from:
        lr *= restart_ramp(cfg, step_in_stage)
    return lr
