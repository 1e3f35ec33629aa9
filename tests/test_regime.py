"""The regime benchmark (benchmarks/regime.py): its budgets and STEP settings derived from the
paper's numbers, and its smoke suite end to end (sweep -> main -> budget curve -> ablations, with a
second worker's --only), on a tiny shape and tiny Shakespeare."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, shared


def _load():
    spec = importlib.util.spec_from_file_location("regime", ROOT / "benchmarks" / "regime.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def regime(tmp_path_factory):
    mod = _load()
    mod.configure(tmp_path_factory.mktemp("cache"), smoke=False)  # the regime's shape; nothing is trained
    return mod


def test_the_shape_is_the_documented_one(regime):
    # d 96, SwiGLU 256 (8/3·d rounded up to 64), 6 blocks: 4·d² (q, k, v, o) + 3·d·256 + 2·d (norms).
    d, f = 96, 256
    assert regime.non_embedding_params() == 6 * (4 * d * d + 3 * d * f + 2 * d) == 664_704


@pytest.mark.parametrize("tpp", [0.5, 2.0, 5.0, 20.0])
def test_budget_is_tokens_per_parameter(regime, tpp):
    b = regime.budget(tpp)
    steps = b["train.max_steps"]
    tokens = steps * regime.TOKENS_PER_STEP
    assert abs(tokens / regime.non_embedding_params() - tpp) <= regime.TOKENS_PER_STEP / 664_704  # one step's rounding
    assert b["train.warmup_steps"] == max(1, round(0.05 * steps))


def test_step_resets_are_table_6s_fraction_of_the_run(regime):
    o = regime.method_overrides("step-2stages", 20.0)
    total = regime.plan_run(regime.R.resolve(o)).total_steps
    # Table 6: ReLoRA reset 5000 and restart warmup 500, of the 368M STEP-2stages run's 33K steps.
    assert o["lora.relora_interval"] == round(5000 / 33_000 * total)
    assert o["lora.relora_warmup"] == round(o["lora.relora_interval"] / 10)
    assert regime.method_overrides("step-2stages-lora", 20.0)["lora.relora_interval"] == 0
    assert regime.method_overrides("step-2stages-tokens", 20.0)["step.budget_match"] == "steps"
    assert regime.method_overrides("step-2stages-paper-flops", 20.0)["step.flops_convention"] == "paper"


@pytest.mark.slow
def test_smoke_suite_end_to_end(tmp_path):
    shared("shakespeare/input.txt")
    cache, out = tmp_path / "cache", tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "regime.py"), "--smoke", "--cache", str(cache), "--out", str(out)]
    # a second worker first: it trains one method's sweep and writes no table into --out
    w = subprocess.run(cmd + ["--suite", "sweep", "--only", "vanilla"], capture_output=True, text=True, timeout=600)
    assert w.returncode == 0, w.stderr[-2000:]
    assert not out.exists() and (cache / "regime-smoke" / "partial" / "regime_sweep.json").is_file()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = json.loads((out / "regime_sweep.json").read_text())
    methods = {row["method"] for row in sweep}
    assert methods == set(_load().LR_GRID)
    for m in methods:
        chosen = [row for row in sweep if row["method"] == m and row["chosen"]]
        assert [c["grid"] for c in chosen] == ["lr", "embedding_lr_scale"]
    main = {row["method"]: row for row in json.loads((out / "regime.json").read_text())}
    assert set(main) == set(_load().MAIN)
    van, step = main["vanilla"], main["step-2stages"]
    assert van["n_seeds"] == step["n_seeds"] == 2 and "val_ppl_ratio" in step
    assert main["step-2stages-tokens"]["tokens"] == van["tokens"]  # the equal-tokens control
    assert main["step-2stages"]["relora_interval"] > 0 and main["step-2stages-lora"]["relora_interval"] == 0
    curve = json.loads((out / "budget_curve.json").read_text())
    assert [p["tokens_per_param"] for p in curve] == [0.01, 0.02]
    assert all(lo <= p["val_ppl_ratio"] <= hi for p in curve for lo, hi in [p["val_ppl_ratio_ci95"]])
    assert (out / "budget_curve.png").stat().st_size > 0
    abl = json.loads((out / "regime_ablations.json").read_text())
    assert set(abl) == {"table4", "table5", "table9", "table10", "relora", "table4-fp32", "relora-fp32"}
    # the smoke trains in fp32 already: the fp32 tables are the same runs, and no dtype effect is claimed
    assert [r["val_ppl"] for r in abl["table4-fp32"]["rows"]] == [r["val_ppl"] for r in abl["table4"]["rows"]]
    assert "bf16_val_ppl" not in abl["table4-fp32"]
    # everything is in the run cache now: a rerun trains nothing and gives the same tables
    runs = sorted(p.name for p in (cache / "regime-smoke" / "runs").iterdir())
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(p.name for p in (cache / "regime-smoke" / "runs").iterdir()) == runs
    assert json.loads((out / "regime.json").read_text()) == list(main.values())
    # --cached builds the ablation tables from finished runs only: a variant whose run is gone (cache and
    # ledger) is named, not trained, and its table keeps the others
    gone = next(r for r in abl["table10"]["rows"] if r["method"] == "grow at 25 %")
    key = Path(gone["run_dirs"][0]).name
    for d in [*(cache / "regime-smoke").rglob(key), *(cache / "regime-smoke").rglob(f"{key}.json")]:
        shutil.rmtree(d) if d.is_dir() else d.unlink()
    runs.remove(key)
    cached = subprocess.run(cmd + ["--suite", "ablations", "--cached"], capture_output=True, text=True, timeout=600)
    assert cached.returncode == 0, cached.stderr[-2000:]
    assert sorted(p.name for p in (cache / "regime-smoke" / "runs").iterdir()) == runs  # nothing trained
    t10 = json.loads((out / "regime_ablations.json").read_text())["table10"]
    assert t10["not_trained"] == ["grow at 25 %"] and "grow at 25 %" in cached.stdout + cached.stderr
    assert [r["method"] for r in t10["rows"]] == [r["method"] for r in abl["table10"]["rows"] if r is not gone]
    assert "Not trained yet: grow at 25 %." in (out / "regime_ablations.md").read_text()
    # its best and verdict are of the variants trained only, and say so (a missing one may still win)
    assert "Verdict so far (of the variants trained): **" in (out / "regime_ablations.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--only", ","], "--only: unknown row or table ''"),
    (["--only", "vanilla,"], "--only: unknown row or table ''"),
    (["--only", "vanila"], "--only: unknown row or table 'vanila'; choose from"),
    (["--only", "table4,tabel5"], "'tabel5'"),
    (["--only", ""], "--only: unknown row or table ''"),
    (["--suite", "main", "--seeds", ""], "--seeds: comma-separated integers, got ''"),
    (["--suite", "main", "--seeds", "0,,1"], "--seeds: comma-separated integers"),
    (["--suite", "main", "--seeds", "7"], "--seeds: 7 not among the suite's seeds (0, 1)"),
    (["--suite", "main", "--seeds", "0,5,9"], "--seeds: 5, 9 not among"),
    (["--suite", "main", "--seeds", "\u0660,1"], "--seeds: comma-separated integers"),
    (["--suite", "main", "--seeds", "+1"], "--seeds: comma-separated integers"),
    (["--suite", "ablations", "--seeds", "1"], "--seeds: --suite ablations trains seed 0 only"),
    # a known name the suite does not train: it trained nothing, silently
    (["--only", "table4"], "--only: --suite sweep trains no 'table4'"),
    (["--only", "vanilla,step-2stages-tokens"], "--only: --suite sweep trains no 'step-2stages-tokens'"),
    # an empty folder read as not given (the default results, the working folder)
    (["--out="], "--out: expected a folder, got an empty string"),
    (["--ledger="], "--ledger: expected a folder, got an empty string"),
])
def test_only_and_seeds_that_would_train_nothing_or_everything_are_refused(tmp_path, args, message):
    # "," or a typo read as "no filter" trains every row; a seed the suite lacks trains nothing
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "regime.py"), "--smoke", "--cache", str(tmp_path),
                        "--out", str(tmp_path / "out"), "--suite", "sweep", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-1500:]
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_a_worker_reads_a_sweep_another_worker_left_in_partial(tmp_path):
    # `--suite sweep --only M` writes its sweep to <cache>/partial; a later `--suite main --only M`
    # must find M's choices there, not skip M as "not swept yet"
    mod = _load()
    mod.configure(tmp_path / "cache", smoke=False)
    mod.CACHE, mod.READ_FROM, mod.ONLY = tmp_path / "cache", tmp_path / "results", {"relora"}
    (tmp_path / "results").mkdir()
    rows = [{"method": "relora", "grid": "lr", "train.lr": 2e-3, "train.embedding_lr_scale": 1.0, "chosen": True},
            {"method": "relora", "grid": "embedding_lr_scale", "train.lr": 2e-3, "train.embedding_lr_scale": 10.0,
             "chosen": True}]
    (tmp_path / "cache" / "partial").mkdir(parents=True)
    (tmp_path / "cache" / "partial" / "regime_sweep.json").write_text(json.dumps(rows))
    assert mod.tuned("relora", tmp_path / "results") == {"train.lr": 2e-3, "train.embedding_lr_scale": 10.0}
    assert mod.tuned("vanilla", tmp_path / "results") is None  # swept nowhere
    # the results folder's sweep wins over a partial one
    (tmp_path / "results" / "regime_sweep.json").write_text(json.dumps([{**r, "train.lr": 4e-3} for r in rows]))
    assert mod.tuned("relora", tmp_path / "results")["train.lr"] == 4e-3


def test_fp32_ablations_are_their_tables_in_fp32_with_one_shared_control(regime):
    # the rows trained on a CPU without native bf16: the same overrides plus train.dtype fp32, and the
    # paper's row among them (an fp32 control), so no verdict compares a bf16 run with an fp32 one
    out = regime.RESULTS
    t4, t4_32 = regime.ablation_variants("table4", out), regime.ablation_variants("table4-fp32", out)
    assert set(t4) == set(t4_32) and any("upper" in m for m in t4_32)
    for m in t4:
        assert [{**o, "train.dtype": "fp32"} for o in t4[m]] == t4_32[m]
    ranks = regime.ablation_variants("relora-fp32", out)
    assert sorted(int(m.rsplit(" r ", 1)[1]) for m in ranks) == sorted(regime.RELORA_TABLE["rank"])
    key = lambda o: regime.R.run_key(regime.R.resolve(regime.R.canonical(o)))  # noqa: E731
    control = next(v for m, v in t4_32.items() if "upper" in m)[0]
    r8 = next(v for m, v in ranks.items() if m.endswith(f" r {regime.BASE['lora.rank']}"))[0]
    assert key(control) == key(r8) != key({**control, "train.dtype": "auto"})


def test_a_sweep_worker_keeps_the_methods_another_worker_swept(tmp_path, monkeypatch):
    # `--suite sweep --only relora`, then `--suite sweep --only galore`: both in <cache>/partial, so a
    # later `--suite main --only relora` still finds relora's choices
    mod = _load()
    mod.configure(tmp_path / "cache", smoke=False)
    mod.CACHE, mod.READ_FROM = tmp_path / "cache", tmp_path / "results"
    out = tmp_path / "cache" / "partial"
    out.mkdir(parents=True)

    def fake_grid(method, base, name, grid, step, cache, rows):
        rows.append({"method": method, name: grid[0], "tune_ppl": 1.0, "command": "", "chosen": True,
                     "at_grid_edge": False})
        return grid[0]
    monkeypatch.setattr(mod, "sweep_grid", fake_grid)
    monkeypatch.setattr(mod, "method_overrides", lambda m, tpp=None: {})
    for m in ("relora", "galore"):
        mod.ONLY = {m}
        mod.suite_sweep(tmp_path / "cache", out)
    assert {r["method"] for r in json.loads((out / "regime_sweep.json").read_text())} == {"relora", "galore"}
    mod.ONLY = {"relora"}
    assert mod.tuned("relora", out) is not None
