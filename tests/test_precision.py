"""Optimizer-state precision (train.optimizer_states, train.master_weights) and the APOLLO baseline:
the planner's per-tensor bytes against the live state of torchao / torch-optimi / apollo-torch, and
measured == planned state bytes for every method and supported precision on tiny configs."""
import time
from types import SimpleNamespace

import pytest
import torch

from steplm import config
from steplm.errors import UserError
from steplm.methods.base import adamw
from steplm.train.loop import Trainer
from steplm.train.metrics import state_bytes
from steplm.plan import memory
from steplm.plan import solve

from conftest import tiny_overrides

pytest.importorskip("torchao")
pytest.importorskip("optimi")

PRECISIONS = [("fp32", "fp32"), ("8bit", "fp32"), ("4bit", "fp32"), ("bf16", "bf16"), ("8bit", "bf16"),
              ("4bit", "bf16")]


def expected_tensor_bytes(n, states, master):
    """Weight + gradient + moments of one tensor of n elements, written out from the libraries' layout."""
    w = 4 if master == "fp32" else 2
    if states == "fp32":
        return 4 * n + 4 * n + 2 * 4 * n
    if states == "bf16":  # optimi: exp_avg, exp_avg_sq and the Kahan compensation, all bf16
        return 2 * n + 2 * n + 3 * 2 * n
    block, code_bytes, qmap = (256, 1, 256) if states == "8bit" else (128, 0.5, 16)
    if n >= 4096 and n % block == 0:  # per moment: codes + one fp32 scale per block + fp32 qmap
        return 2 * w * n + 2 * int(code_bytes * n + 4 * n / block + 4 * qmap)
    return 2 * w * n + 2 * w * n


def _cfg(states, master):
    return SimpleNamespace(train=SimpleNamespace(lr=1e-3, beta1=0.9, beta2=0.95, optimizer_states=states,
                                                 master_weights=master))


@pytest.mark.parametrize("states,master", PRECISIONS)
@pytest.mark.parametrize("shape", [(64, 64), (64, 176), (8, 64), (4100,), (64,)])
def test_tensor_bytes_match_live_optimizer_state(states, master, shape):
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.randn(shape))
    opt = adamw(_cfg(states, master), [{"params": [module.w], "weight_decay": 0.0}], fused=False)
    for _ in range(2):
        module.w.grad = torch.randn_like(module.w)
        opt.step()
    n = module.w.numel()
    measured = state_bytes(module, opt)["total"]
    assert measured == expected_tensor_bytes(n, states, master)
    assert measured == memory.tensor_state_bytes(n, memory.Precision(states, master))
    assert module.w.dtype == (torch.float32 if master == "fp32" else torch.bfloat16)


def test_unsupported_combinations_name_the_key(tmp_path):
    cfg = config.load(None, tiny_overrides(tmp_path, **{"train.optimizer_states": "bf16"}))
    with pytest.raises(UserError, match=r"^train\.optimizer_states: bf16 moments need train\.master_weights: bf16"):
        config.validate(cfg)
    cfg = config.load(None, tiny_overrides(tmp_path, **{"train.master_weights": "bf16"}))
    with pytest.raises(UserError, match=r"^train\.master_weights: bf16 weights need"):
        config.validate(cfg)
    cfg = config.load(None, tiny_overrides(tmp_path, **{"method": "galore", "train.optimizer_states": "8bit"}))
    with pytest.raises(UserError, match=r"^train\.optimizer_states: method galore keeps its own"):
        config.validate(cfg)
    cfg = config.load(None, tiny_overrides(tmp_path, **{"train.optimizer_states": "2bit"}))
    with pytest.raises(UserError, match=r"train\.optimizer_states: must be one of fp32, bf16, 8bit, 4bit, got '2bit'"):
        config.validate(cfg)


@pytest.mark.parametrize("flags, first, cited", [
    (["--optimizer-states", "bf16", "--master-weights", "fp32"], "--optimizer-states", "--master-weights"),
    (["--optimizer-states", "fp32", "--master-weights", "bf16"], "--master-weights", "--optimizer-states"),
    (["--master-weights", "bf16", "--optimizer-states", "fp32", "--budget-gb", "30"], "--master-weights",
     "--optimizer-states"),
])
def test_plan_flag_refuses_unsupported_precision_under_its_flags(capsys, flags, first, cited):
    """The flag form runs the config's own precision check; the line names the flags typed, the one
    at fault first and the other where the message cites it, and no config key."""
    from steplm.cli import main

    assert main(["plan", "--preset", "1.2b", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"steplm: error: {first}: ") and cited in err[0]
    assert "train." not in err[0]


def _layer_costs_written_out(d, f, kv, r, states, master):
    """Eq. 2's slopes from the block's tensors: g per new layer, k per old (bf16 + adapters)."""
    tensors = [d * d, d * kv, d * kv, d * d, d * f, d * f, f * d, d, d]
    adapters = [r * n for i, o in [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)] for n in (i, o)]
    g = sum(expected_tensor_bytes(n, states, master) for n in tensors)
    k = 2 * sum(tensors) + sum(expected_tensor_bytes(n, states, master) for n in adapters)
    return g, k


def test_eq3_reoptimises_the_split_for_8bit_states():
    """1.2b shape (real FFN 5504, LLaMA's rounding): the best 2-stage split by brute force over the
    written-out slopes, for fp32 and 8-bit states; the planner agrees with both."""
    d, f, r, L = 2048, 5504, 128, 24
    shape = memory.LayerShape(d, f, d)
    for states in ("fp32", "8bit"):
        g, k = _layer_costs_written_out(d, f, d, r, states, "fp32")
        best = min(([n, L - n] for n in range(1, L)), key=lambda s: (max(g * s[0], g * s[1] + k * s[0]), -s[0]))
        plan = solve.optimize(L, 2, shape, r, prec=memory.Precision(states, "fp32"))
        assert plan.layers_per_stage == best
        assert plan.peak_bytes == max(g * best[0], g * best[1] + k * best[0])
        assert plan.vanilla_bytes == g * L
    assert solve.optimize(L, 2, shape, r).layers_per_stage != \
        solve.optimize(L, 2, shape, r, prec=memory.Precision("8bit")).layers_per_stage


def test_budget_search_over_stages_and_precision_is_deepest_and_fast():
    shape, r, budget = memory.LayerShape(2048), 128, 8e9
    t0 = time.process_time()
    plan = solve.deepest_over(budget, list(range(1, solve.MAX_SEARCH_STAGES + 1)), memory.PRECISIONS, shape, r)
    assert time.process_time() - t0 < 1.0  # CPU time: a shared machine's waiting does not count
    L = sum(plan.layers_per_stage)
    for prec in memory.PRECISIONS:
        for K in (1, 2, 3):
            assert sum(solve.deepest_within(budget, K, shape, r, prec=prec).layers_per_stage) <= L
    assert plan.peak_bytes <= budget
    assert (plan.optimizer_states, plan.master_weights) != ("fp32", "fp32")  # lower precision goes deeper


def _run(tmp_path, method, states, master, **extra):
    """A 4-step tiny run at d 64, where the 64×64 weights and the embeddings are quantized and
    the norms and adapters are not (torchao quantizes only tensors of >= 4096 elements)."""
    overrides = {"method": method, "model.d_model": 64, "train.max_steps": 4, "train.optimizer_states": states,
                 "train.master_weights": master, **extra}
    cfg = config.load(None, tiny_overrides(tmp_path, **overrides))
    tr = Trainer(cfg, tmp_path / f"{method}-{states}-{master}", progress=False)
    return tr, tr.fit()


METHOD_EXTRA = {"vanilla": {}, "step": {"step.n_stages": 2, "step.layers_per_stage": "[2,2]"},
                "relora": {"lora.relora_interval": 2, "lora.warm_start_fraction": 0.5}}
FAST = [("step", "8bit", "fp32"), ("relora", "4bit", "bf16"), ("vanilla", "bf16", "bf16")]
MATRIX = [(m, s, w) for m in METHOD_EXTRA for s, w in PRECISIONS]


@pytest.mark.parametrize("method,states,master", [
    pytest.param(*c, marks=() if c in FAST else pytest.mark.slow) for c in MATRIX])
def test_measured_state_equals_planned(tmp_path, method, states, master):
    tr, summary = _run(tmp_path, method, states, master, **METHOD_EXTRA[method])
    assert len(summary["stages"]) == (1 if method == "vanilla" else 2)
    for st in summary["stages"]:
        assert st["measured_state_bytes"]["layers"] == st["planned_state_bytes"]["layers"]
        assert st["measured_state_bytes"]["total"] == st["planned_state_bytes"]["total"]
    if method == "step":  # Eq. 2 from the written-out slopes
        m = tr.cfg.model
        g, k = _layer_costs_written_out(m.d_model, m.ffn_hidden, m.n_kv_heads * m.head_dim, tr.cfg.lora.rank,
                                        states, master)
        assert [s["measured_state_bytes"]["layers"] for s in summary["stages"]] == [2 * g, 2 * g + 2 * k]
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())


def test_apollo_measured_equals_planned(tmp_path):
    pytest.importorskip("apollo_torch")
    tr, summary = _run(tmp_path, "apollo", "fp32", "fp32", **{"apollo.rank": 8})
    (st,) = summary["stages"]
    m, r = tr.cfg.model, 8
    d, f, kv = m.d_model, m.ffn_hidden, m.n_kv_heads * m.head_dim
    per_layer = 16 * 2 * d + sum(8 * i * o + 8 * r * max(i, o) + 4 * r * min(i, o)
                                 for i, o in [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)])
    assert st["measured_state_bytes"]["layers"] == st["planned_state_bytes"]["layers"] == m.n_layers * per_layer
    assert st["measured_state_bytes"]["total"] == st["planned_state_bytes"]["total"]
    assert st["measured_state_bytes"]["layers"] < 16 * m.n_layers * (4 * d * d + 3 * d * f + 2 * d)
