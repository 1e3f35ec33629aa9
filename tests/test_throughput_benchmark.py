"""benchmarks/throughput.py's loss-chunk sweep at a tiny shape: every chunk size runs the real fused
loss, and the tracked peak grows with the chunk (the memory side of the speed/memory trade)."""
import importlib.util

from conftest import ROOT


def _bench():
    spec = importlib.util.spec_from_file_location("throughput_bench", ROOT / "benchmarks" / "throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_interleaved_rounds_rotate_the_order_and_time_every_call():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    times = _bench().interleaved(fns, rounds=4, reps=2, before=lambda: calls.append("-"))
    runs = [c for c in calls if c != "-"]
    assert calls.count("-") == len(runs) == 4 * 3 * 2
    firsts = runs[::6]  # each round is 3 fns x 2 reps; round r starts at fn r mod 3
    assert firsts == ["a", "b", "c", "a"]
    assert all(len(v) == 4 and all(t >= 0 for t in v) for v in times.values())


def test_interleaved_setup_runs_untimed_before_each_block_of_its_row():
    """The per-row host-allocator switch: once before every block of that row's calls, outside its timing."""
    import time
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "ab"}
    setup = {"a": lambda: (calls.append("set a"), time.sleep(0.1))}
    times = _bench().interleaved(fns, rounds=3, reps=1, setup=setup)
    assert calls == ["set a", "a", "b", "b", "set a", "a", "set a", "a", "b"]
    assert max(times["a"]) < 0.05  # the sleep in setup is not in the row's time


def test_median_of_an_even_count_is_the_mean_of_the_middle_two():
    median = _bench().median
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5 and median([3.0, 1.0, 2.0]) == 2.0


def test_loss_chunk_sweep_peaks_grow_with_the_chunk():
    """Eager here to stay quick; the compiled fused loss is checked against torch's in test_loss.py."""
    mod = _bench()
    shape = {"model.d_model": 32, "model.vocab_size": 1000, "train.micro_batch": 2, "train.seq_len": 128}
    chunks = (4, 16, 64)  # rows per chunk, of 256
    res = mod.loss_chunk_sweep(shape, chunk_rows=chunks, rounds=1, reps=1, compiled=False)
    assert list(res) == [f"fused, {r}-row chunks" for r in chunks] + ["unfused"]
    peaks = [res[f"fused, {r}-row chunks"]["tracked_peak_bytes"] for r in chunks]
    assert peaks[0] < peaks[1] < peaks[2] < res["unfused"]["tracked_peak_bytes"]
    assert res["unfused"]["speed_vs_unfused"] == 1.0 and all(v["seconds_median"] > 0 for v in res.values())


def test_lora_linear_sweep_times_the_three_linears_of_each_block_shape(monkeypatch):
    """The sweep's rows are the block's three linear shapes, each with the trainable reference at
    ratio 1; the adapter row runs steplm's own LoRA function (a broken one fails the sweep)."""
    import pytest
    from steplm.passes import lora
    mod = _bench()
    shape = {"model.d_model": 32, "train.micro_batch": 2, "train.seq_len": 16}
    res = mod.lora_linear_sweep(shape, rank=4, rounds=1, reps=1)
    f = mod.config.load(None, ["model.d_model=32"]).model.ffn_hidden
    assert list(res) == ["32->32", f"32->{f}", f"{f}->32"]
    for rows in res.values():
        assert list(rows) == ["trainable", "frozen, no adapter", "frozen + rank-4 adapter"]
        assert rows["trainable"]["vs_trainable"] == 1.0
        assert all(r["seconds_median"] > 0 for r in rows.values())
    monkeypatch.setattr(lora._LoRALinearFunction, "backward", staticmethod(lambda ctx, g: (None,) * 6))
    with pytest.raises(RuntimeError):  # wrong number of gradients: the adapter row really calls it
        mod.lora_linear_sweep(shape, rank=4, rounds=1, reps=1)


def test_without_adapters_leaves_the_frozen_gemm_alone(tmp_path):
    """The floor row: the final STEP stage with every adapter switched off trains its new layers and
    gives the adapters no gradient; its frozen linears compute x·Wᵀ of the stored bf16 weight."""
    import torch

    from steplm import config
    from steplm.passes.lora import LoRALinear
    from steplm.train.loop import Trainer

    from conftest import tiny_overrides

    cfg = config.load(None, tiny_overrides(tmp_path, **{"method": "step", "step.n_stages": 2,
                                                        "step.layers_per_stage": "[2,2]", "train.compile": False}))
    t = Trainer(cfg, tmp_path / "run", progress=False)
    t.next_stage()
    frozen = [m for m in t.model.modules() if isinstance(m, LoRALinear)]
    assert frozen and all(m.rank for m in frozen)
    with torch.no_grad():
        frozen[0].lora_B.normal_()  # an adapter that would change the output if it were applied
    mod = _bench()
    mod.without_adapters(t)
    x = torch.randn(3, frozen[0].in_features)
    torch.testing.assert_close(frozen[0](x), x @ frozen[0].weight.float().t(), rtol=1e-2, atol=1e-2)
    t.train_step()
    adapters = [p for n, p in t.model.named_parameters() if "lora_" in n]
    trainable = [p for n, p in t.model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert adapters and all(p.grad is None for p in adapters)
    assert trainable and all(p.grad is not None for p in trainable)


def test_adapter_cost_merge_only_does_the_big_gemms_of_the_real_function():
    """benchmarks/adapter_cost.py's timing-only variant gives steplm's LoRA function's output and
    input gradient (so 'adapters - merge only' is the cost of the rank-r products) and no adapter
    gradients (so the optimizer skips the adapters, as in the adapter-free floor)."""
    import importlib.util

    import torch

    from steplm.passes.lora import _LoRALinearFunction

    spec = importlib.util.spec_from_file_location("adapter_cost", ROOT / "benchmarks" / "adapter_cost.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 16, generator=g).bfloat16()
    A, B = torch.randn(4, 16, generator=g), torch.randn(24, 4, generator=g)
    outs = []
    for fn in (_LoRALinearFunction, mod.MergeOnly):
        x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        a, b = A.clone().requires_grad_(), B.clone().requires_grad_()
        y = fn.apply(x, w, None, a, b, 2.0, torch.float32)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), x.grad, a.grad, b.grad))
    (y0, dx0, da0, db0), (y1, dx1, da1, db1) = outs
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(dx1, dx0)
    assert da0.abs().sum() > 0 and db0.abs().sum() > 0
    assert da1 is None and db1 is None


def test_with_lora_function_swaps_every_adapted_linear(tmp_path):
    """The A/B scripts' swap: every adapted frozen linear calls the given function (here one that
    records its calls and computes as steplm's), the output is unchanged, and a step still trains."""
    import torch

    from steplm import config
    from steplm.passes.lora import _LoRALinearFunction, lora_modules
    from steplm.train.loop import Trainer

    from conftest import tiny_overrides

    calls = []

    class Recording(_LoRALinearFunction):
        @staticmethod
        def forward(ctx, x, *rest):
            calls.append(x.dtype)
            return _LoRALinearFunction.forward(ctx, x, *rest)

    cfg = config.load(None, tiny_overrides(tmp_path, **{"method": "step", "step.n_stages": 2,
                                                        "step.layers_per_stage": "[2,2]", "train.compile": False}))
    t = Trainer(cfg, tmp_path / "run", progress=False)
    t.next_stage()
    mods = lora_modules(t.model)
    x = torch.randn(3, mods[0].in_features, requires_grad=True)
    before = mods[0](x)
    _bench().with_lora_function(t, Recording)
    torch.testing.assert_close(mods[0](x), before)
    calls.clear()
    t.train_step()
    assert len(calls) == len(mods) and all(c == torch.float32 for c in calls)
    assert all(m.lora_B.grad is not None for m in mods)


def test_attention_sweep_times_both_backwards_and_reports_their_error(monkeypatch):
    """Both rows run (torch's SDPA first, the ratio's reference), each with its gradient error
    against fp64, small for both; the steplm row really calls CausalAttention's backward."""
    import pytest
    from steplm.model import attention
    mod = _bench()
    shape = {"model.d_model": 32, "model.n_heads": 2, "train.micro_batch": 2, "train.seq_len": 24}
    res = mod.attention_sweep(shape, rounds=1, reps=1, compiled=False)
    assert list(res) == ["torch SDPA (flash backward)", "steplm CausalAttention (matmul backward)"]
    assert res["torch SDPA (flash backward)"]["vs_torch"] == 1.0
    for row in res.values():
        assert row["seconds_median"] > 0 and all(0 < e < 1e-2 for e in row["relative_l2_error_vs_fp64"].values())
    monkeypatch.setattr(attention.CausalAttention, "backward", staticmethod(lambda ctx, g: (None,) * 6))
    with pytest.raises(AttributeError):  # q.grad stays None: the row is steplm's function
        mod.attention_sweep(shape, rounds=1, reps=1, compiled=False)
