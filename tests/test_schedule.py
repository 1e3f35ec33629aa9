"""The learning-rate schedule's ends (train/schedule.py): the peak on the warmup's last step and only
there, the floor on the schedule's last step and only there, for one cosine, STEP's restarts (cut
stages end above the floor) and ReLoRA's restart ramps. Pure: plans and lr values, no training."""
import math

import pytest

from steplm import config
from steplm.methods.base import restart_ramp
from steplm.plan.stages import plan_run
from steplm.train.schedule import lr_at

LR, FLOOR_RATIO = 3e-3, 0.1


def load(**over):
    cfg = config.load(None, [f"{k}={v}" for k, v in {"train.lr": LR, "train.min_lr_ratio": FLOOR_RATIO,
                                                      **over}.items()])
    config.validate(cfg)
    return cfg, plan_run(cfg)


def stage_lrs(cfg, stage) -> list[float]:
    """The lr of every step of ``stage`` as the trainer asks for it (step in stage, global step)."""
    return [lr_at(cfg, stage, j, stage.start_step + j) for j in range(stage.steps)]


def cosine(s: int, peak_step: int, last_step: int) -> float:
    """The cosine at position ``s`` from LR at ``peak_step`` to LR · FLOOR_RATIO at ``last_step``."""
    progress = (s - peak_step) / (last_step - peak_step)
    return LR * (FLOOR_RATIO + (1 - FLOOR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def assert_rises_to_one_peak_then_falls(lrs: list[float], peak_step: int):
    """Strictly up to ``peak_step`` (at LR), strictly down after it: no lr on two steps in a row."""
    assert lrs[peak_step] == pytest.approx(LR, rel=1e-12)
    assert all(a < b for a, b in zip(lrs[:peak_step], lrs[1:peak_step + 1])), lrs[:peak_step + 1]
    assert all(a > b for a, b in zip(lrs[peak_step:], lrs[peak_step + 1:])), lrs[peak_step:]


@pytest.mark.parametrize("method,max_steps,warmup", [
    ("vanilla", 40, 5),  # issue #34: the last step had 3.054e-4, not 3.0e-4
    ("vanilla", 40, 0),  # no warmup: the peak is step 0
    ("vanilla", 10, 1),  # one warmup step is the peak itself: the same schedule as no warmup
    ("vanilla", 7, 5),   # two steps of cosine after the peak, the second on the floor
    ("vanilla", 6, 5),   # the shortest run that decays: the peak, then the floor
    ("relora", 40, 4),   # one cosine over two stages (full warm start, then LoRA)
])
def test_one_cosine_peaks_once_and_reaches_its_floor_on_the_last_step(method, max_steps, warmup):
    over = {"method": method, "train.max_steps": max_steps, "train.warmup_steps": warmup}
    if method == "relora":
        over.update({"lora.relora_interval": 10, "lora.relora_warmup": 0})  # no restart ramp: the bare cosine
    cfg, plan = load(**over)
    lrs = [lr for st in plan.stages for lr in stage_lrs(cfg, st)]
    assert len(lrs) == plan.total_steps and all(st.schedule_steps == plan.total_steps for st in plan.stages)
    peak = max(warmup, 1) - 1
    assert_rises_to_one_peak_then_falls(lrs, peak)
    assert lrs[:peak] == pytest.approx([LR * (s + 1) / warmup for s in range(peak)], rel=1e-12)
    assert lrs[-1] == pytest.approx(LR * FLOOR_RATIO, rel=1e-12)  # the floor, on the last step
    assert lrs[-2] > LR * FLOOR_RATIO * (1 + 1e-9)  # and not before it
    last = len(lrs) - 1
    assert lrs[peak + 1:] == pytest.approx([cosine(s, peak, last) for s in range(peak + 1, last + 1)], rel=1e-12)


@pytest.mark.parametrize("budget_match,warmup", [("steps", 4), ("flops", 4), ("steps", 1), ("flops", 0)])
def test_step_rewarms_to_one_peak_per_stage_and_only_the_full_schedule_reaches_the_floor(budget_match, warmup):
    """Each STEP stage restarts the schedule at step 0 of the stage. A stage cut at
    step.growth_fraction of its nominal cosine (schedule_steps N) ends on position steps - 1 of it,
    above the floor, which sits on position N - 1; the last stage runs its whole cosine to the floor."""
    cfg, plan = load(**{"method": "step", "step.n_stages": 3, "train.max_steps": 60, "train.warmup_steps": warmup,
                        "step.budget_match": budget_match})
    peak = max(warmup, 1) - 1
    *cut, final = plan.stages
    assert all(st.steps < st.schedule_steps for st in cut) and final.steps == final.schedule_steps
    for st in plan.stages:
        lrs = stage_lrs(cfg, st)
        assert_rises_to_one_peak_then_falls(lrs, peak)
        nominal_last = st.schedule_steps - 1
        assert lrs[-1] == pytest.approx(cosine(st.steps - 1, peak, nominal_last), rel=1e-12)
        assert lr_at(cfg, st, nominal_last, st.start_step + nominal_last) == pytest.approx(LR * FLOOR_RATIO, rel=1e-12)
    for st in cut:
        assert stage_lrs(cfg, st)[-1] > LR * FLOOR_RATIO * (1 + 1e-3)  # cut before the floor
    assert stage_lrs(cfg, final)[-1] == pytest.approx(LR * FLOOR_RATIO, rel=1e-12)


@pytest.mark.parametrize("method,interval,ramp", [("relora", 10, 4), ("relora", 7, 6), ("step", 6, 3)])
def test_restart_ramp_reaches_the_cosine_on_its_last_step_and_repeats_no_lr(method, interval, ramp):
    """After each reset the lr ramps over lora.relora_warmup R steps: (j + 1)/R of the cosine on the
    j-th step after it, the cosine itself on the R-th and after; no lr is used on two steps in a row."""
    over = {"method": method, "train.max_steps": 60, "train.warmup_steps": 3, "lora.relora_interval": interval,
            "lora.relora_warmup": ramp}
    if method == "step":
        over["step.n_stages"] = 2
    cfg, plan = load(**over)
    ramped = [st for st in plan.stages if st.adapter_resets]
    assert ramped
    for st in ramped:
        factors = [restart_ramp(cfg, j) for j in range(st.restart_ramp_from, st.steps)]
        want = [min((j % interval + 1) / ramp, 1.0) for j in range(st.restart_ramp_from, st.steps)]
        assert factors == pytest.approx(want, rel=1e-15)
    lrs = [lr for st in plan.stages for lr in stage_lrs(cfg, st)]
    assert all(a != pytest.approx(b, rel=1e-12) for a, b in zip(lrs, lrs[1:]))
