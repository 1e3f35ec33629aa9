"""The replication benchmark's machinery at a tiny scale: the interleaved throughput phase, the
budget-planner row and the run cache (the full benchmark is `make replicate`)."""
import importlib.util
import json

import pytest

from conftest import ROOT, shared, tiny_overrides
from steplm import planner
from steplm.config import load
from steplm.stages import layer_shape


@pytest.fixture
def rep(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("replicate", ROOT / "benchmarks" / "replicate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tiny = tiny_overrides(tmp_path, **{"model.d_model": 64, "lora.rank": 4, "step.n_stages": 2})
    base = dict(item.split("=", 1) for item in tiny)
    monkeypatch.setattr(mod, "BASE", base)
    monkeypatch.setattr(mod, "GALORE", {**mod.GALORE, "galore.rank": 4})
    monkeypatch.setattr(mod, "WIKI_TOKENS", 2048)
    monkeypatch.setattr(mod, "TP_ROUNDS", 2)
    monkeypatch.setattr(mod, "TP_STEPS", 1)
    return mod


def test_budget_row_is_deepest_split_within_vanilla_memory(rep):
    row = rep.budget_row()
    cfg = load(None, [f"{k}={v}" for k, v in rep.BASE.items()])
    P = planner.params_per_layer(layer_shape(cfg.model))
    E = planner.lora_params_per_layer(layer_shape(cfg.model), cfg.lora.rank)
    budget = 16 * cfg.model.n_layers * P  # Eq. 1 at vanilla's depth

    def peak(split):  # Eq. 2, written out
        return max(16 * split[0] * P, 16 * split[1] * P + 2 * split[0] * P + 16 * split[0] * E)

    split = json.loads(row["step.layers_per_stage"])
    L = row["model.n_layers"]
    assert sum(split) == L and peak(split) <= budget
    assert all(peak([a, L + 1 - a]) > budget for a in range(1, L + 1))  # one layer deeper never fits
    assert row["train.max_steps"] == round(int(rep.BASE["train.max_steps"]) * cfg.model.n_layers / L)


def test_throughput_times_each_final_stage_against_vanilla_of_same_depth(rep):
    variants = rep.throughput_variants()
    rows = {r["method"]: r for r in rep.throughput(variants)}
    L = rep.budget_row()["model.n_layers"]
    depth = int(rep.BASE["model.n_layers"])
    assert rows["vanilla"]["step_time_vs_vanilla"] == 1.0
    assert rows[f"vanilla-{L}-layers"]["step_time_vs_vanilla"] == 1.0
    assert rows["step-2stages-budget"]["vanilla_reference"] == f"vanilla-{L}-layers"
    for m in ("relora", "galore", "step-2stages", "step-3stages"):
        assert rows[m]["final_layers"] == depth and rows[m]["vanilla_reference"] == "vanilla"
        assert rows[m]["step_seconds"] > 0 and rows[m]["steps_timed"] == 2
    # The timed models really are in their last stage: trainable = new layers + adapters of the old
    # ones + the always-trainable embeddings, head and final norm.
    cfg = load(None, [f"{k}={v}" for k, v in rep.BASE.items()])
    P = planner.params_per_layer(layer_shape(cfg.model))
    E = planner.lora_params_per_layer(layer_shape(cfg.model), cfg.lora.rank)
    outer = rows["vanilla"]["trainable_params"] - depth * P
    n1, n2 = planner.optimize(depth, 2, layer_shape(cfg.model), cfg.lora.rank).layers_per_stage
    assert rows["step-2stages"]["trainable_params"] == outer + n2 * P + n1 * E
    assert rows["relora"]["trainable_params"] == outer + depth * (E + 2 * cfg.model.d_model)  # + norms


def test_run_cache_reuses_a_finished_identical_run(rep, tmp_path):
    shared("wikitext2/test.txt")
    short = {"train.max_steps": 4}
    first = rep.run(short, tmp_path / "out")
    stamp = (tmp_path / "out" / "runs").stat().st_mtime_ns, sorted((tmp_path / "out" / "runs").iterdir())
    again = rep.run(short, tmp_path / "out")
    assert again["run_dir"] == first["run_dir"] and again["final_val_ppl"] == first["final_val_ppl"]
    assert sorted((tmp_path / "out" / "runs").iterdir()) == stamp[1]
    other = rep.run({"train.max_steps": 5}, tmp_path / "out")  # a different config trains anew
    assert other["run_dir"] != first["run_dir"] and other["tokens_seen"] > first["tokens_seen"]
