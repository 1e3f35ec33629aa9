"""The stage plan (pure), methods as plug-ins, and `steplm plan CONFIG` against a real run."""
import json
import subprocess
import sys

import pytest
import torch

from steplm import config, methods
from steplm.methods.base import Method
from steplm.plan.stages import plan_run
from steplm.train.loop import Trainer
from steplm.plan import memory

from conftest import ROOT, tiny_overrides
from test_cli import assert_one_line_error, run_cli

STEP3 = {"method": "step", "step.n_stages": 3, "step.layers_per_stage": "[2,1,1]", "train.max_steps": 16}


def test_plan_modules_do_not_import_torch():
    code = ("import sys; import steplm.plan.stages, steplm.methods, steplm.plan.memory, steplm.plan.solve, "
            "steplm.config; print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


@pytest.mark.parametrize("args,needle", [
    (["plan", "configs/tiny-step.yaml"], "peak model-state memory vs vanilla"),
    (["plan", "configs/paper-1.2b-3stage.yaml", "--set", "lora.relora_interval=0", "--json"], '"layers_per_stage"'),
    (["plan", "--hidden", "2048", "--layers", "24"], "reduction"),
    (["plan", "configs/tiny.yaml", "--set", "model.n_heads=5"], "steplm: error: model.d_model"),
    (["plan", "--hidden", "64", "--layers", "4", "--n-heads", "3"], "steplm: error: --hidden: must be divisible"),
    (["plan", "--preset", "368m", "--extended"], "peak of a training step"),
    (["plan", "--hidden", "256", "--layers", "6", "--write-config", "/dev/null/x.yaml"], "steplm: error: --write-config"),
])
def test_plan_runs_where_torch_cannot_be_imported(args, needle):
    """`steplm plan` is pure planning: with torch made unimportable (as on a machine without it) it
    still plans a config and a shape, and still refuses bad input in one line."""
    code = ("import sys; sys.modules['torch'] = None; from steplm.cli.main import main; "
            f"sys.exit(main({args!r}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""})
    assert "Traceback" not in res.stderr, res.stderr
    assert needle in res.stdout + res.stderr
    assert res.returncode == (2 if "error" in needle else 0)


def test_plan_cli_matches_trainer_records_of_a_3_stage_run(tmp_path):
    """`steplm plan CONFIG --json` before training == what the trainer then did and measured."""
    sets = [x for kv in tiny_overrides(tmp_path, **STEP3) for x in ("--set", kv)]
    res = run_cli("plan", *sets, "--json")
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    res = run_cli("train", "--out", str(tmp_path / "run"), "--quiet", *sets)
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    records = summary["stages"]
    assert [s["steps"] for s in plan["stages"]] == summary["stage_steps"] == [r["steps"] for r in records]
    assert plan["layers_per_stage"] == summary["layers_per_stage"] == [2, 1, 1]
    flops_before = {"paper": 0, "corrected": 0}
    tokens_before = 0
    for planned, rec in zip(plan["stages"], records, strict=True):
        for key in ("layers", "new_layers"):
            assert planned[key] == rec[key]
        for key in ("trainable_params", "frozen_params", "lora_params"):
            assert planned[key] == rec[key]
        # what the trainer counted while it trained
        assert planned["tokens"] == rec["tokens"] - tokens_before
        for conv in flops_before:
            assert planned["flops"][conv] == rec["flops"][conv] - flops_before[conv]
        flops_before, tokens_before = rec["flops"], rec["tokens"]
        # memory: what the planner promised is what the live tensors held
        assert planned["planned_state_bytes"] == rec["planned_state_bytes"] == rec["measured_state_bytes"]
    assert plan["totals"]["tokens"] == summary["tokens_seen"]
    assert plan["totals"]["flops"] == summary["flops_by_convention"]
    # the parameter counts, from the model's real linears (not from the planner)
    cfg = config.load(None, tiny_overrides(tmp_path, **STEP3))
    d, f, r = cfg.model.d_model, cfg.model.ffn_hidden, cfg.lora.rank
    P, E = 4 * d * d + 3 * d * f + 2 * d, r * (4 * 2 * d + 3 * (d + f))
    assert [s["trainable_params"] for s in plan["stages"]] == [2 * P, P + 2 * E, P + 3 * E]
    assert [s["frozen_params"] for s in plan["stages"]] == [0, 2 * P, 3 * P]
    assert plan["vanilla"]["planned_state_bytes"]["layers"] == 16 * 4 * P  # Eq. 1


def test_plan_cli_text_table(tmp_path):
    res = run_cli("plan", "configs/paper-1.2b-3stage.yaml")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    rows = [ln.split() for ln in lines if ln.split() and ln.split()[0] in ("1", "2", "3")]
    assert [int(r[2]) for r in rows] == [10, 18, 24]  # Eq. 3's optimum at d 2048, L 24, K 3
    d = 2048
    shape = memory.LayerShape(d, 5504)
    P = memory.params_per_layer(shape)
    assert "vanilla" in res.stdout and "peak model-state memory vs vanilla" in res.stdout
    assert f"{16 * 24 * P / 1e9:.2f}" in res.stdout  # Eq. 1 for the vanilla row


@pytest.mark.parametrize("args,needle", [
    (["configs/tiny.yaml", "--hidden", "64"], "--hidden"),
    (["configs/tiny.yaml", "--set", "model.n_layers=0"], "model.n_layers"),
    (["configs/tiny-step.yaml", "--set", "step.layers_per_stage=[1,1]"], "step.layers_per_stage"),
    (["--hidden", "64", "--layers", "4", "--set", "train.lr=1"], "--hidden"),
    (["configs/missing.yaml"], "config file not found"),
])
def test_plan_config_bad_input(args, needle):
    assert_one_line_error(run_cli("plan", *args), needle)


def test_relora_without_warm_start_trains_adapters_from_step_one(tmp_path):
    """Under FLOPs matching the LoRA phase has more steps than train.max_steps; it must still be LoRA."""
    cfg = config.load(None, tiny_overrides(tmp_path, **{"method": "relora", "lora.relora_interval": 4,
                                                        "lora.warm_start_fraction": 0.0}))
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    assert len(tr.plan.stages) == 1 and tr.plan.stages[0].kind == "lora"
    assert tr.plan.stages[0].steps > cfg.train.max_steps
    s = tr.fit()
    st = s["stages"][0]
    assert st["measured_state_bytes"] == st["planned_state_bytes"]


class SGDMethod(Method):
    """A toy method defined outside the package: plain SGD, half the layers frozen from the start."""
    name = "toy-sgd"

    def stage_counts(self, cfg, layers_per_stage):
        P = memory.params_per_layer(methods.base.layer_shape(cfg.model))
        L = cfg.model.n_layers
        return [{"layers": L, "new_layers": L, "trainable": (L - L // 2) * P, "frozen": L // 2 * P, "lora": 0}]

    def layer_state_bytes(self, cfg, layers_per_stage, counts):
        P = memory.params_per_layer(methods.base.layer_shape(cfg.model))
        L = cfg.model.n_layers
        return [8 * (L - L // 2) * P + 2 * (L // 2) * P]  # fp32 weight + grad, no moments; bf16 frozen

    def outer_state_bytes(self, cfg):
        m = cfg.model
        return 8 * (2 * m.vocab_size * m.d_model + m.d_model)

    def enter_stage(self, run, stage):
        from steplm.passes.lora import apply_lora
        for block in run.model.model.layers[: run.cfg.model.n_layers // 2]:
            apply_lora(block, 0, 1.0)

    def build_optimizer(self, cfg, model, groups, fused):
        return torch.optim.SGD(groups, lr=cfg.train.lr)


def test_a_new_method_is_one_class_and_one_registry_line(tmp_path, monkeypatch):
    monkeypatch.setitem(methods.REGISTRY, SGDMethod.name, SGDMethod())
    cfg = config.load(None, tiny_overrides(tmp_path, **{"method": "toy-sgd", "train.max_steps": 4}))
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    assert isinstance(tr.optimizer, torch.optim.SGD)
    st = tr.fit()["stages"][0]
    assert st["measured_state_bytes"] == st["planned_state_bytes"]
    assert st["frozen_params"] == cfg.model.n_layers // 2 * memory.params_per_layer(
        methods.base.layer_shape(cfg.model))


@pytest.mark.parametrize("preset,conv", [("tiny-step3.yaml", "paper"), ("paper-1.2b-3stage.yaml", "paper"),
                                         ("paper-368m.yaml", "corrected")])
def test_staged_plan_spends_vanilla_flops(preset, conv):
    """Budget matching: the stages' FLOPs add up to vanilla's within one step of the dearest stage."""
    cfg = config.load(ROOT / "configs" / preset, ["method=step", f"step.flops_convention={conv}"])
    plan = plan_run(cfg)
    per_step = max(s.flops[conv] // s.steps for s in plan.stages)
    assert abs(plan.totals()["flops"][conv] - plan.vanilla["flops"][conv]) <= per_step
    # the cosine of every early stage is cut at step.growth_fraction of its nominal length
    for s in plan.stages[:-1]:
        assert s.steps == pytest.approx(cfg.step.growth_fraction * s.schedule_steps, abs=1)
    assert [s.start_step for s in plan.stages] == [sum(plan.steps[:i]) for i in range(len(plan.stages))]


def _warmup_plan(tmp_path, **over):
    cfg = config.load(None, tiny_overrides(tmp_path, **over))
    config.validate(cfg)
    return plan_run(cfg)


def _warmup_line(W, named) -> str:
    parts = " and ".join(f"{name} ({n} step{'s' * (n != 1)}, the last at {round(100 * n / W)} % of train.lr)"
                         for name, n in named)
    return (f"train.warmup_steps ({W}) is not shorter than {parts}, whose lr stays in warmup to the end and never "
            f"decays; lower train.warmup_steps")


@pytest.mark.parametrize("over", [
    {"method": "step", "step.n_stages": 2, "step.layers_per_stage": "[2,2]", "train.max_steps": 18,
     "step.budget_match": "steps"},
    {**STEP3, "train.max_steps": 30},
    {"method": "step-no-pet", "step.n_stages": 2, "step.layers_per_stage": "[2,2]", "train.max_steps": 20},
])
def test_plan_warns_of_each_stage_no_longer_than_its_warmup(tmp_path, over):
    """Each STEP stage restarts the schedule: a stage of train.warmup_steps steps or fewer never
    leaves its warmup, and is named; one step longer, it is not. The warmup stays as given."""
    steps = _warmup_plan(tmp_path, **over).steps
    for W in sorted({n for n in steps} | {n - 1 for n in steps} - {0}):
        plan = _warmup_plan(tmp_path, **over, **{"train.warmup_steps": W})
        named = [(f"stage {i + 1}", n) for i, n in enumerate(steps) if n <= W]
        assert plan.warnings == ([_warmup_line(W, named)] if named else []), (W, steps)
        assert plan.steps == steps  # the plan is the same, only said


@pytest.mark.parametrize("over", [
    {"method": "vanilla", "train.max_steps": 7},
    {"method": "vanilla", "train.max_steps": 1},
    # ReLoRA: one cosine over two stages
    {"method": "relora", "lora.relora_interval": 3, "lora.relora_warmup": 2, "train.max_steps": 8},
])
def test_plan_warns_of_a_one_cosine_run_no_longer_than_its_warmup(tmp_path, over):
    total = _warmup_plan(tmp_path, **over).total_steps
    assert _warmup_plan(tmp_path, **over, **{"train.warmup_steps": total}).warnings == [
        _warmup_line(total, [("the run", total)])]
    assert _warmup_plan(tmp_path, **over, **{"train.warmup_steps": total - 1}).warnings == []


@pytest.mark.parametrize("over,ramped", [
    ({"method": "relora", "lora.warm_start_fraction": 0.25, "train.max_steps": 40}, "stage 2"),
    ({"method": "step", "step.n_stages": 2, "step.layers_per_stage": "[2,2]", "train.max_steps": 60}, "stage 2"),
])
@pytest.mark.parametrize("interval,ramp", [(4, 4), (3, 5), (5, 4), (9, 1)])
def test_plan_warns_of_resets_no_further_apart_than_their_restart_ramp(tmp_path, over, ramped, interval, ramp):
    """ReLoRA resets every lora.relora_interval k steps and ramps the lr over lora.relora_warmup R:
    with k <= R the ramp runs from each reset to the next, and the plan says so; with k > R, not."""
    plan = _warmup_plan(tmp_path, **over, **{"lora.relora_interval": interval, "lora.relora_warmup": ramp})
    want = [f"lora.relora_interval ({interval}) is not longer than lora.relora_warmup ({ramp}): in {ramped} the lr "
            f"ramps from each reset to the next, reaching {round(100 * interval / ramp)} % of its cosine by then, and "
            f"never runs on it; lower lora.relora_warmup"]
    assert plan.warnings == (want if interval <= ramp else [])


def test_plan_cli_prints_the_warmup_warning(tmp_path):
    """`steplm plan` says it under the table and in --json; training says it once on stderr."""
    sets = [x for kv in tiny_overrides(tmp_path, **STEP3, **{"train.warmup_steps": 9}) for x in ("--set", kv)]
    steps = _warmup_plan(tmp_path, **STEP3).steps
    named = [(f"stage {i + 1}", n) for i, n in enumerate(steps) if n <= 9]
    assert named
    res = run_cli("plan", *sets)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "warning: " + _warmup_line(9, named)
    res = run_cli("plan", *sets, "--json")
    assert json.loads(res.stdout)["warnings"] == [_warmup_line(9, named)]

