"""The replication benchmark's machinery: the smoke suite end to end (sweep -> main -> stats ->
ablation verdicts -> K-curve -> JSON/MD), the ratio CI, the verdict logic, the Table 4 split,
the budget-planner row, the run cache and the reproduce commands (the full run is
`python benchmarks/replicate.py`)."""
import importlib.util
import json
import math
import random
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from conftest import ROOT, shared
from steplm.config import load
from steplm.passes.growth import insertion_gaps
from steplm.plan.stages import layer_shape, plan_run
from steplm.plan import memory


def _load():
    spec = importlib.util.spec_from_file_location("replicate", ROOT / "benchmarks" / "replicate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def rep(tmp_path):
    shared("shakespeare/input.txt")
    mod = _load()
    mod.smoke_setup(tmp_path / "cache")
    mod.LEDGER = tmp_path / "ledger"  # never the committed one
    return mod


def test_ratio_ci_covers_the_true_ratio_95_percent_of_the_time(rep):
    # Brute force: lognormal seeds with a known ratio of geometric means; Welch's interval on log
    # ppl must cover it about 95 % of the time with 3 seeds a side (binomial SD ~0.5 % at 2000).
    rng = random.Random(0)
    true_ratio, hits, n = 0.9, 0, 2000
    for _ in range(n):
        van = [math.exp(rng.gauss(math.log(120), 0.02)) for _ in range(3)]
        step = [math.exp(rng.gauss(math.log(120 * true_ratio), 0.04)) for _ in range(3)]
        ratio, (lo, hi) = rep.ratio_ci95(step, van)
        hits += lo <= true_ratio <= hi
        assert lo < ratio < hi
    assert 0.93 <= hits / n <= 0.975


def test_ratio_ci_textbook_case_and_single_seed(rep):
    # Equal variances and sizes: Welch = pooled t; d = -0.1, se = sqrt(2 * 0.01 / 3), t(4) = 2.776.
    van = [math.exp(x) for x in (4.9, 5.0, 5.1)]
    step = [math.exp(x) for x in (4.8, 4.9, 5.0)]
    ratio, (lo, hi) = rep.ratio_ci95(step, van)
    half = 2.7764451051977987 * math.sqrt(2 * 0.01 / 3)
    assert ratio == pytest.approx(math.exp(-0.1))
    assert lo == pytest.approx(math.exp(-0.1 - half)) and hi == pytest.approx(math.exp(-0.1 + half))
    assert rep.ratio_ci95([100.0], van)[1] is None


def test_verdict_is_judged_against_the_seed_spread(rep):
    assert rep.verdict("a", {"a": 100.0, "b": 110.0}, noise_sd=1.0) == "reproduced"
    assert rep.verdict("a", {"a": 100.0, "b": 102.0}, noise_sd=1.0) == "same order, within noise"
    assert rep.verdict("a", {"a": 110.0, "b": 100.0}, noise_sd=1.0) == "contradicted"
    assert rep.verdict("a", {"a": 101.0, "b": 100.0, "c": 120.0}, noise_sd=1.0) == "not resolved (within noise)"


def test_table4_split_separates_the_four_positions(rep):
    for L in (12, 8):
        n_old, n_new = rep.table4_split(L, 0)
        gaps = {p: tuple(insertion_gaps(n_old, n_new, p, 0)) for p in ("upper", "intermediate", "lower", "random")}
        assert n_old + n_new == L and len(set(gaps.values())) == 4


def test_budget_row_is_deepest_split_within_vanilla_memory(rep):
    row = rep.budget_row()
    cfg = rep.resolve({})
    P = memory.params_per_layer(layer_shape(cfg.model))
    E = memory.lora_params_per_layer(layer_shape(cfg.model), cfg.lora.rank)
    budget = 16 * cfg.model.n_layers * P  # Eq. 1 at vanilla's depth

    def peak(split):  # Eq. 2, written out
        return max(16 * split[0] * P, 16 * split[1] * P + 2 * split[0] * P + 16 * split[0] * E)

    split = json.loads(row["step.layers_per_stage"])
    L = row["model.n_layers"]
    assert sum(split) == L and peak(split) <= budget
    assert all(peak([a, L + 1 - a]) > budget for a in range(1, L + 1))  # one layer deeper never fits


@pytest.mark.parametrize("conv", ["corrected", "paper"])
def test_budget_row_trains_at_vanillas_flops(rep, conv):
    """The deeper row's step budget matches vanilla's FLOPs under each count to within one step of
    the deeper vanilla (the corrected count's head and attention terms do not scale with depth)."""
    row = rep.budget_row(conv)
    target = plan_run(rep.resolve({"step.flops_convention": conv})).vanilla["flops"][conv]
    deep = plan_run(rep.resolve({**row, "step.flops_convention": conv}))
    per_step = deep.vanilla["flops"][conv] / deep.vanilla["steps"]
    assert abs(deep.vanilla["flops"][conv] - target) <= per_step / 2
    assert abs(sum(s.flops[conv] for s in deep.stages) - target) <= per_step  # the staged run too


def test_canonical_shares_runs_whose_plan_ignores_the_flops_convention(rep):
    assert rep.canonical({"step.flops_convention": "paper"})["step.flops_convention"] == "corrected"
    assert rep.canonical({**rep.STEP2, "step.flops_convention": "paper"})["step.flops_convention"] == "paper"


@pytest.mark.parametrize("shape", [{}, {"model.d_model": 96, "model.n_heads": 3}, {"model.d_model": 1024}])
def test_a_changed_default_keeps_the_keys_of_cached_runs(shape):
    """Runs cached under the old defaults (galore.rank 16, apollo.rank 256, data.exclude [test, tests,
    idle_test], train.host_allocator retain, each written out in their config) keep their keys now that
    the ranks follow the shape, data.exclude is empty and the host allocator is auto (which retains at
    these sizes), where the run does not read the key (every replication row but the
    projected method's own rank); a run that reads it changes key with it."""
    mod = _load()  # the replication's own BASE (d 256), not the smoke shape
    old = {"galore.rank": 16, "apollo.rank": 256, "data.exclude": "[test, tests, idle_test]",
           "train.host_allocator": "retain"}
    for row in ({}, mod.STEP2, mod.relora(), mod.galore()):
        assert mod.run_key(mod.resolve({**shape, **row})) == mod.run_key(mod.resolve({**shape, **row, **old})), row
    assert mod.resolve({**shape, **mod.galore()}).galore.rank == 16  # explicit: the same value as before
    apollo = {**shape, "method": "apollo"}
    if mod.resolve(apollo).apollo.rank != 256:  # the rank it reads follows the shape: another run
        assert mod.run_key(mod.resolve(apollo)) != mod.run_key(mod.resolve({**apollo, "apollo.rank": 256}))


def test_memory_probe_matches_the_plan_per_stage(rep, tmp_path):
    rows = rep.memory_probe({**rep.STEP3}, tmp_path / "probe")
    assert [r["stage"] for r in rows] == [1, 2, 3]  # numbered from 1, as metrics.jsonl and plan number them
    assert all(r["planned_state_bytes"] == r["measured_state_bytes"] for r in rows)
    assert all(r["tracked_peak_bytes"] > r["measured_state_bytes"]["total"] for r in rows)


@pytest.mark.slow
def test_smoke_suite_end_to_end_and_resume(rep, tmp_path, monkeypatch):
    out, cache = tmp_path / "results", tmp_path / "cache"
    monkeypatch.setattr(sys, "argv", ["replicate.py", "--suite", "smoke", "--cache", str(cache), "--out", str(out)])
    rep.main()
    sweep = json.loads((out / "lr_sweep.json").read_text())
    assert {r["method"] for r in sweep} == set(rep.LR_GRID)
    assert all(sum(r["chosen"] for r in sweep if r["method"] == m) == 1 for m in rep.LR_GRID)
    emb = json.loads((out / "embedding_lr.json").read_text())
    assert [(r["method"], r["embedding_lr_scale"]) for r in emb] == [
        (m, k) for m, grid in rep.EMBEDDING_LR_GRID.items() for k in grid]
    for m, grid in rep.EMBEDDING_LR_GRID.items():
        mine = [r for r in emb if r["method"] == m]
        swept = next(r for r in sweep if r["method"] == m and r["chosen"])
        # scale 1 is the sweep's own run
        assert mine[0]["val_ppl"] == swept["val_ppl"] and mine[0]["command"] == swept["command"]
        assert len({r["val_ppl"] for r in mine}) == len(mine)  # the other scales train differently
        assert all("train.embedding_lr_scale" in r["command"] for r in mine[1:])
        assert [r for r in mine if r["chosen"]] == [min(mine, key=lambda r: r["val_ppl"])]
    main = {r["method"]: r for r in json.loads((out / "replication.json").read_text())}
    assert list(main) == ["vanilla", "relora", "galore", "step-2stages", "step-3stages", "step-2stages-budget"]
    chosen = {r["method"]: r["lr"] for r in sweep if r["chosen"]}
    scale = {r["method"]: r["embedding_lr_scale"] for r in emb if r["chosen"]}
    for m, r in main.items():  # the sweeps' choices feed the table
        src = "step-2stages" if m in ("step-2stages-budget", "step-3stages") else m
        assert r["lr"] == chosen["step-2stages" if m == "step-2stages-budget" else m]
        assert r["embedding_lr_scale"] == scale.get(src, 1.0)  # GaLore: not swept, the one lr
        assert ("train.embedding_lr_scale" in r["command"]) == (r["embedding_lr_scale"] != 1.0)
        assert r["planned_peak_bytes"] == r["measured_peak_bytes"]
        assert r["tokens"] > 0 and r["wall_seconds"] > 0 and r["tokens_per_second"] > 0
        assert r["command"].startswith("steplm train --out ")
    assert main["vanilla"]["n_seeds"] == len(rep.SEEDS) and "val_ppl_ratio" not in main["vanilla"]
    lo, hi = main["step-2stages"]["val_ppl_ratio_ci95"]
    assert lo <= main["step-2stages"]["val_ppl_ratio"] <= hi
    assert main["relora"]["single_seed"] and main["relora"]["val_ppl_ratio_ci95"] is None
    for t, m in main["vanilla"]["tasks"].items():
        assert 0 <= m["acc"] <= 1 and m["chance"] == (0.0 if t == "lambada" else pytest.approx(m["chance"]))
    assert main["vanilla"]["tasks"]["piqa"]["chance"] == 0.5
    paper = {r["method"]: r for r in json.loads((out / "replication_paper_flops.json").read_text())}
    assert paper["vanilla"]["run_dirs"] == main["vanilla"]["run_dirs"]  # shared: same run
    assert paper["step-2stages"]["run_dirs"] != main["step-2stages"]["run_dirs"]
    for name in ("table4", "table5", "table9", "table10"):
        t = json.loads((out / f"{name}.json").read_text())
        assert t["verdict"] in ("reproduced", "same order, within noise", "contradicted", "not resolved (within noise)")
        assert t["noise_sd"] == main["step-2stages"]["val_ppl_spread"]
    prec = {r["method"]: r for r in json.loads((out / "precision.json").read_text())}
    assert set(prec) == {"vanilla", "vanilla, 8-bit states", "step-3stages", "step-3stages, 8-bit states"}
    assert prec["vanilla"]["run_dirs"] == main["vanilla"]["run_dirs"]  # the fp32 rows are the main table's runs
    for m in ("vanilla", "step-3stages"):
        q = prec[f"{m}, 8-bit states"]
        assert q["planned_peak_bytes"] == q["measured_peak_bytes"] < prec[m]["planned_peak_bytes"]
        lo, hi = q["val_ppl_ratio_vs_fp32_ci95"]
        assert lo <= q["val_ppl_ratio_vs_fp32"] <= hi
    k = json.loads((out / "kcurve.json").read_text())
    assert [len(r["layers_per_stage"]) for r in k[1:]] == list(rep.K_STAGES)
    assert (out / "kcurve.png").stat().st_size > 0 and (out / "replication.md").is_file()
    assert all(r["val_ppl_ratio"] == pytest.approx(r["val_ppl"] / k[0]["val_ppl"]) for r in k[1:])  # one seed each
    lines = (out / "kcurve.md").read_text().splitlines()[4:]  # the rows, vanilla first
    assert [line.split(" | ")[4] for line in lines] == ["–"] + [
        f"{100 * (r['planned_peak_bytes'] / k[0]['planned_peak_bytes'] - 1):+.0f} %" for r in k[1:]]
    meta = json.loads((out / "meta.json").read_text())
    assert set(meta["minutes_per_suite"]) == set(rep.ALL)
    # the main suite's clean-cache cost: every distinct run of its two tables, each at its own
    # recorded training wall time plus its timed evaluations
    dirs = {d for f in ("replication.json", "replication_paper_flops.json")
            for r in json.loads((out / f).read_text()) for d in r["run_dirs"]}
    cost = 0.0
    for d in dirs:
        ev = json.loads((Path(d) / "eval.json").read_text())
        cost += json.loads((Path(d) / "summary.json").read_text())["wall_seconds"] + ev.get("tasks_seconds", 0)
        cost += sum(v["seconds"] for v in ev.values() if isinstance(v, dict) and "seconds" in v)
    assert meta["run_minutes_per_suite"]["main"]["runs"] == len(dirs)
    assert meta["run_minutes_per_suite"]["main"]["minutes"] == pytest.approx(cost / 60)

    # The command reproduces the run's config; a second invocation trains nothing.
    d = main["step-3stages"]["run_dirs"][0]
    args = shlex.split(main["step-3stages"]["command"])
    from steplm.cli import build_parser
    parsed = build_parser().parse_args(args[1:])  # what `steplm train` itself reads from the command
    assert args[0] == "steplm" and parsed.cmd == "train"
    assert load(None, parsed.set).to_dict() == load(f"{d}/config.yaml").to_dict()
    runs = sorted((cache / "smoke" / "runs").iterdir())
    monkeypatch.setattr(rep, "Trainer", None)  # any training now would fail
    rep.run_suite("main", cache / "smoke", out)
    assert sorted((cache / "smoke" / "runs").iterdir()) == runs

    # A new machine: an empty run cache, but the ledger (results without weights) rebuilds every
    # table, plots included, without training or probing; only the run folders differ.
    ledger = cache / "smoke" / "ledger"
    assert sorted(p.name for p in (ledger / "runs").iterdir()) == [p.name for p in runs]
    assert not list(ledger.rglob("*.safetensors")) and not list(ledger.rglob("*.pt"))
    before = {f.name: json.loads(f.read_text()) for f in out.glob("*.json") if f.name != "meta.json"}
    shutil.rmtree(cache / "smoke" / "runs")
    shutil.rmtree(cache / "smoke" / "probes")
    monkeypatch.setattr(rep, "memory_probe", None)
    monkeypatch.setattr(rep, "LEDGER", ledger)
    for name in rep.ALL[:-1]:  # the throughput suite times steps: not a cached result
        rep.run_suite(name, cache / "smoke", out)
    assert not (cache / "smoke" / "runs").exists()

    def same(a, b):  # equal but for where the run lies
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(k in ("run_dirs", "run_dir") or same(a[k], b[k]) for k in a)
        if isinstance(a, list):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == b
    after = {f.name: json.loads(f.read_text()) for f in out.glob("*.json") if f.name != "meta.json"}
    assert after.keys() == before.keys() and all(same(before[k], after[k]) for k in before), \
        [k for k in before if not same(before[k], after[k])]
    assert all(d.startswith(str(ledger)) for d in json.loads((out / "replication.json").read_text())[0]["run_dirs"])
    assert "seed SD" in (out / "replication.md").read_text() and "**not judged" not in (out / "replication.md").read_text()

    # One seed a row: the scale check does not call a spread it never measured "met".
    monkeypatch.setattr(rep, "SEEDS", rep.SEEDS[:1])
    rep.run_suite("main", cache / "smoke", out)
    md = (out / "replication.md").read_text()
    assert "seed SD not measured" in md and "**not judged: one seed has no spread**" in md


def test_a_diverged_grid_point_ranks_last_and_stays_diverged(rep, tmp_path, monkeypatch):
    """A sweep run that stops on a bad batch (NaN loss injected at step 3, train.on_nonfinite=stop)
    becomes a row with val ppl inf and the reason, is never chosen, and is not retrained on resume."""
    cache, res = tmp_path / "cache", tmp_path / "res"
    res.mkdir()
    rep.BASE["train.on_nonfinite"] = "stop"
    rep.METHODS = ("vanilla",)
    real = rep.short_run

    def short_run(method, overrides, cache):
        if overrides["train.lr"] == 1e-2:
            monkeypatch.setenv("STEPLM_FAULT", "nan_at_step:3")
        try:
            return real(method, overrides, cache)
        finally:
            monkeypatch.delenv("STEPLM_FAULT", raising=False)

    monkeypatch.setattr(rep, "short_run", short_run)
    rows = rep.suite_sweep(cache, res)
    assert [r["lr"] for r in rows] == list(rep.LR_GRID["vanilla"])
    bad = next(r for r in rows if r["lr"] == 1e-2)
    assert bad["val_ppl"] == math.inf and "step 3" in bad["diverged"] and not bad["chosen"]
    assert [r["chosen"] for r in rows].count(True) == 1
    assert all(math.isfinite(r["val_ppl"]) and "diverged" not in r for r in rows if r is not bad)
    monkeypatch.setattr(rep, "Trainer", None)  # any training now would fail
    assert rep.suite_sweep(cache, res) == rows


def test_estimate_counts_every_distinct_run(rep):
    runs = rep.planned_runs()
    est = rep.estimate(1.0)
    assert est["runs"] == len(runs) and est["hours"] == pytest.approx(est["vanilla_step_equivalents"] / 3600)
    # vanilla at the paper count is the same run as at the corrected count: counted once
    main_vanilla = [r for r in runs if r.get("method", "vanilla") == "vanilla" and "train.max_steps" not in r
                    and "train.optimizer_states" not in r]
    # the main table's seeds, plus the K-curve's vanilla where its depth differs from the main one
    deeper = rep.KCURVE_LAYERS != int(rep.BASE["model.n_layers"])
    assert len(main_vanilla) == len(rep.SEEDS) + deeper
    # the precision suite's 8-bit runs are runs of their own
    assert sum(1 for r in runs if r.get("train.optimizer_states") == "8bit") == 2 * len(rep.SEEDS)
