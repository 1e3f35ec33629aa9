"""Planner: Eq. 1-5 numbers derived by hand, exact solver and HiGHS against brute force, ties, budget mode,
bounds on every input."""
import itertools
import json

import pytest

from steplm.cli import main
from steplm.plan.memory import LayerShape
from steplm.plan import memory
from steplm.plan import solve

GB = 1e9


def eq2_by_hand(split, d, r):
    """Eq. 2 written out independently of the planner: P = 12d²+2d, E = 19rd."""
    P, E = 12 * d * d + 2 * d, 19 * r * d
    out, before = [], 0
    for n in split:
        out.append(16 * n * P + 2 * before * P + 16 * before * E)
        before += n
    return out


def brute_force(L, K, d, r, cap=False):
    """Minimum peak over every composition of L into K positive parts, and the argmins."""
    best, arg = None, []
    for cuts in itertools.combinations(range(1, L), K - 1):
        split = [b - a for a, b in zip((0,) + cuts, cuts + (L,))]
        if cap and any(split[i] > sum(split[:i]) for i in range(1, K)):
            continue
        peak = max(eq2_by_hand(split, d, r))
        if best is None or peak < best:
            best, arg = peak, [split]
        elif peak == best:
            arg.append(split)
    return best, arg


def test_eq4_eq5_paper_defaults():
    assert memory.params_per_layer(LayerShape(1600)) == 12 * 1600**2 + 2 * 1600
    assert memory.lora_params_per_layer(LayerShape(1600), 128) == 19 * 128 * 1600


def test_generalised_shapes_count_real_linears():
    s = LayerShape(64, ffn_hidden=192, kv_dim=32)
    assert memory.params_per_layer(s) == 64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 192 + 2 * 64
    assert memory.lora_params_per_layer(s, 4) == 4 * (2 * 128 + 2 * 96 + 3 * 256)


@pytest.mark.parametrize("d,L,K,split,peak_gb,vanilla_gb", [
    (1600, 12, 2, [7, 5], 3.44, 5.90),
    (1536, 24, 2, [14, 10], 6.34, 10.87),
    (2048, 24, 2, [13, 11], 11.20, None),
    (2048, 24, 3, [10, 8, 6], 8.25, None),
])
def test_issue_rows(d, L, K, split, peak_gb, vanilla_gb):
    plan = solve.optimize(L, K, LayerShape(d), 128)
    assert plan.layers_per_stage == split
    assert round(plan.peak_bytes / GB, 2) == peak_gb == round(max(eq2_by_hand(split, d, 128)) / GB, 2)
    if vanilla_gb:
        assert round(plan.vanilla_bytes / GB, 2) == vanilla_gb


def test_paper_table1_rows_for_1_2b_are_not_optimal():
    ours2, paper2 = solve.optimize(24, 2, LayerShape(2048), 128), solve.evaluate_split([14, 10], LayerShape(2048), 128)
    ours3, paper3 = solve.optimize(24, 3, LayerShape(2048), 128), solve.evaluate_split([11, 8, 5], LayerShape(2048), 128)
    assert round(paper2.peak_bytes / GB, 2) == 11.28 and ours2.peak_bytes < paper2.peak_bytes
    assert round(paper3.peak_bytes / GB, 2) == 8.86 and ours3.peak_bytes < paper3.peak_bytes
    assert round(100 * ours3.reduction, 1) == 57.3


@pytest.mark.parametrize("d,r", [(2048, 128), (256, 8)])
def test_dp_and_milp_match_brute_force(d, r):
    P, E = memory.params_per_layer(LayerShape(d)), memory.lora_params_per_layer(LayerShape(d), r)
    for L in range(1, 25):
        for K in range(1, min(6, L) + 1):
            best, arg = brute_force(L, K, d, r)
            sol = solve.solve_exact(L, K, P, E)
            assert sol.peak == best and sol.ties == sorted(arg) and sol.latest == max(arg), (L, K)
            milp = solve.solve_milp(L, K, P, E, time_limit=None)  # correctness, not speed
            assert max(memory.stage_bytes(milp, P, E)) == best, (L, K, milp)


def test_cap_growth_constraint_matches_brute_force():
    P, E = memory.params_per_layer(LayerShape(512)), memory.lora_params_per_layer(LayerShape(512), 16)
    for L in range(3, 16):
        for K in range(2, 5):
            if K > L:
                continue
            best, arg = brute_force(L, K, 512, 16, cap=True)
            if best is None:
                continue
            sol = solve.solve_exact(L, K, P, E, cap_growth=True)
            assert (sol.peak, sol.ties, sol.latest) == (best, sorted(arg), max(arg))
            milp = solve.solve_milp(L, K, P, E, cap_growth=True, time_limit=None)
            assert max(memory.stage_bytes(milp, P, E)) == best


def test_optimize_returns_dp_answer_and_reports_ties():
    plan = solve.optimize(24, 10, LayerShape(2048), 128)
    best, arg = brute_force(24, 10, 2048, 128)
    assert plan.peak_bytes == best and plan.layers_per_stage in arg
    assert plan.tied_optima == sorted(arg) and plan.layers_per_stage == max(arg)


def test_budget_mode_is_deepest_fitting():
    shape = LayerShape(1024)
    budget = 4 * GB
    plan = solve.deepest_within(budget, 2, shape, 64)
    L = sum(plan.layers_per_stage)
    assert brute_force(L, 2, 1024, 64)[0] <= budget < brute_force(L + 1, 2, 1024, 64)[0]
    with pytest.raises(ValueError):
        solve.deepest_within(1e6, 2, shape, 64)


def test_plan_cli_json(capsys):
    assert main(["plan", "--preset", "1.2b-3stage", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layers_per_stage"] == [10, 8, 6] and out["cumulative_layers"] == [10, 18, 24]
    assert out["peak_bytes"] == max(out["stage_bytes"]) == max(eq2_by_hand([10, 8, 6], 2048, 128))
    assert out["params_per_layer"] == 12 * 2048**2 + 2 * 2048
    assert main(["plan", "--hidden", "2048", "--layers", "24", "--stages", "2", "--lora-rank", "128",
                 "--layers-per-stage", "14,10", "--json"]) == 0
    given = json.loads(capsys.readouterr().out)
    assert given["stage_bytes"] == eq2_by_hand([14, 10], 2048, 128)
    assert main(["plan", "--hidden", "1600", "--layers", "12", "--extended", "--seq-len", "1024",
                 "--micro-batch", "1", "--n-heads", "25", "--json"]) == 0
    ext = json.loads(capsys.readouterr().out)["extended"]
    assert ext["embedding_head_norm_bytes"] == 16 * (2 * 50257 * 1600 + 1600)


@pytest.mark.parametrize("args,flag", [
    (["--hidden", "64", "--layers", "4", "--stages", "5"], "--stages"),
    (["--hidden", "64", "--layers", "4", "--lora-rank", "65"], "--lora-rank"),
    (["--hidden", "64", "--layers", "4", "--layers-per-stage", "2,1"], "--layers-per-stage"),
    (["--hidden", "2048", "--budget-gb", "0.01"], "--budget-gb"),
])
def test_plan_bad_input(capsys, args, flag):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert flag in err and len(err.splitlines()) == 1


def brute_force_bytes(L, K, g, k, cap=False):
    """Minimum of max_i(g·n_i + k·N_(i-1)) over every composition, and the argmins (any g, k)."""
    best, arg = None, []
    for cuts in itertools.combinations(range(1, L), K - 1):
        split = [b - a for a, b in zip((0,) + cuts, cuts + (L,))]
        if cap and any(split[i] > sum(split[:i]) for i in range(1, K)):
            continue
        peak = max(g * n + k * sum(split[:i]) for i, n in enumerate(split))
        if best is None or peak < best:
            best, arg = peak, [split]
        elif peak == best:
            arg.append(split)
    return best, arg


def test_exact_solver_matches_brute_force_on_random_shapes():
    """Random P and E, so the frozen cost k = 2P + 16E falls below, equals or exceeds g = 16P."""
    import random
    rng = random.Random(0)
    cases = [(rng.randint(1, 14), rng.randint(1, 60), rng.choice([0, rng.randint(0, 90)]), rng.random() < 0.5)
             for _ in range(400)] + [(12, 8, 7, False), (12, 8, 7, True)]  # 16P == 2P + 16E
    for L, P, E, cap in cases:
        for K in range(1, min(L, 5) + 1):
            best, arg = brute_force_bytes(L, K, 16 * P, 2 * P + 16 * E, cap)
            if best is None:
                with pytest.raises(ValueError):
                    solve.solve_exact(L, K, P, E, cap)
                continue
            sol = solve.solve_exact(L, K, P, E, cap, max_ties=10**6)
            assert (sol.peak, sol.ties, sol.latest, sol.truncated) == (best, sorted(arg), max(arg), False), \
                (L, K, P, E, cap)
            few = solve.solve_exact(L, K, P, E, cap, max_ties=2)
            assert few.ties == sorted(arg)[:2] and few.truncated == (len(arg) > 2)


@pytest.fixture(scope="module")
def warm_imports():
    """The timing below is the planner's, not the interpreter's first import of scipy.optimize."""
    import scipy.optimize  # noqa: F401
    assert main(["plan", "--hidden", "64", "--layers", "8", "--json"]) == 0


@pytest.mark.parametrize("args", [
    ["--hidden", "1024", "--layers", "100000", "--stages", "50"],
    ["--hidden", "1024", "--layers", "100000", "--stages", "50", "--cap-growth"],
    ["--hidden", "1048576", "--layers", str(solve.MAX_LAYERS), "--stages", str(solve.MAX_STAGES)],
    ["--hidden", "1024", "--layers", "5000", "--stages", "64", "--lora-rank", "1024"],
    ["--hidden", "1024", "--budget-gb", "1e12"],
    ["--hidden", "1024", "--budget-gb", "1e300", "--stages", str(solve.MAX_STAGES), "--cap-growth"],
    ["--hidden", "2048", "--budget-gb", "1e9", "--stages", "64", "--extended", "--seq-len", "1073741824",
     "--micro-batch", "1073741824", "--vocab-size", "1073741824"],
    ["--hidden", "1024", "--layers", "300000", "--stages", "3", "--layers-per-stage", "100000,100000,100000"],
])
def test_huge_inputs_answer_within_a_second(warm_imports, capsys, args):
    """Huge inputs cost under a second of CPU (process time, so a shared machine's waiting does not
    count): no search grows with the layer count or the budget beyond that."""
    import time
    t0 = time.process_time()
    rc = main(["plan", *args, "--json"])
    elapsed = time.process_time() - t0
    out, err = capsys.readouterr()
    assert elapsed < 1.0, (args, elapsed)
    if rc == 0:
        plan = json.loads(out)
        assert plan["peak_bytes"] == max(plan["stage_bytes"])
    else:
        assert rc == 2 and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("args,flag,bound", [
    (["--hidden", "1024", "--layers", str(solve.MAX_LAYERS + 1)], "--layers", str(solve.MAX_LAYERS)),
    (["--hidden", "1024", "--layers", "5000", "--stages", str(solve.MAX_STAGES + 1)], "--stages",
     str(solve.MAX_STAGES)),
    (["--hidden", str(solve.MAX_WIDTH + 1), "--layers", "4"], "--hidden", str(solve.MAX_WIDTH)),
    (["--hidden", "64", "--layers", "4", "--ffn-hidden", str(solve.MAX_WIDTH + 1)], "--ffn-hidden",
     str(solve.MAX_WIDTH)),
    (["--hidden", "64", "--layers", "2000", "--stages", "1025", "--layers-per-stage", ",".join(["1"] * 1025)],
     "--stages", str(solve.MAX_STAGES)),
    (["--hidden", "64", "--layers", "2000", "--layers-per-stage", ",".join(["1"] * 2000)], "--layers-per-stage",
     str(solve.MAX_STAGES)),
    (["--hidden", "64", "--budget-gb", "inf"], "--budget-gb", "finite"),
    (["--hidden", "64", "--budget-gb", "nan"], "--budget-gb", "finite"),
    (["--hidden", "64", "--budget-gb", "lots"], "--budget-gb", "number"),
    (["--hidden", "64", "--layers", "4", "--layers-per-stage", "2,x"], "--layers-per-stage", "integers"),
    (["--hidden", "64", "--layers", "4", "--seq-len", str(2**40)], "--seq-len", str(2**30)),
])
def test_out_of_bound_inputs_are_refused_with_the_bound(capsys, args, flag, bound):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err and bound in err, err


def test_budget_mode_says_when_it_stops_at_the_cap(capsys):
    assert main(["plan", "--hidden", "1024", "--budget-gb", "1e12", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert sum(plan["layers_per_stage"]) == plan["capped_at_layers"] == solve.MAX_LAYERS
    assert main(["plan", "--hidden", "1024", "--budget-gb", "1e12"]) == 0
    assert f"capped: the budget fits at least {solve.MAX_LAYERS} layers" in capsys.readouterr().out
    assert main(["plan", "--hidden", "1024", "--budget-gb", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["capped_at_layers"] is None
    plan = solve.deepest_within(1e30, 2, LayerShape(64), 8, max_layers=100)
    assert sum(plan.layers_per_stage) == plan.capped_at_layers == 100


def test_budget_mode_with_extra_bytes_matches_brute_force():
    shape, r = LayerShape(256), 8
    extra = lambda L: 3_000_000 * L  # noqa: E731
    for budget in (5e7, 2e8, 1e9):
        L = sum(solve.deepest_within(budget, 3, shape, r, extra_bytes=extra).layers_per_stage)
        assert brute_force(L, 3, 256, r)[0] + extra(L) <= budget < brute_force(L + 1, 3, 256, r)[0] + extra(L + 1)


@pytest.mark.parametrize("shape", [
    {"B": 8, "T": 64, "d": 64, "h": 2, "L": 4, "V": 512},
    {"B": 4, "T": 128, "d": 128, "h": 4, "L": 2, "V": 2048},
])
def test_extended_step_peak_matches_the_tracked_peak_of_a_real_step(tmp_path, capsys, shape):
    """`plan --extended`'s step peak (activation model of the fused head + loss) against torch's
    MemTracker over one real eager fp32 step of the same shape, within 10 %."""
    from steplm import config
    from steplm.train.loop import Trainer

    from conftest import tiny_overrides
    B, T, d, h, L, V = (shape[k] for k in ("B", "T", "d", "h", "L", "V"))
    cfg = config.load(None, tiny_overrides(tmp_path, **{
        "model.d_model": d, "model.n_heads": h, "model.n_layers": L, "model.max_seq_len": T, "model.vocab_size": V,
        "train.seq_len": T, "train.micro_batch": B, "train.max_steps": 3, "data.tokenizer": "bpe:512"}))
    tracked = Trainer(cfg, tmp_path / "run", progress=False).fit()["stages"][0]["peak_bytes"]
    assert main(["plan", "--hidden", str(d), "--layers", str(L), "--stages", "1", "--n-heads", str(h),
                 "--ffn-hidden", str(cfg.model.ffn_hidden), "--vocab-size", str(V), "--seq-len", str(T),
                 "--micro-batch", str(B), "--extended", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)["extended"]["peak_bytes"]
    assert planned == pytest.approx(tracked, rel=0.10)
