"""attention.CausalAttention (flash forward, matmul backward) against torch's SDPA in fp64."""
import pytest
import torch
import torch.nn.functional as F

from steplm.model.attention import CausalAttention, use_matmul_backward


def _inputs(B, H, T, hd, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, hd, generator=g).bfloat16().requires_grad_() for _ in range(3))
    return q, k, v, torch.randn(B, H, T, hd, generator=g).bfloat16()


def _grads(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(do.to(out.dtype))
    return out, [t.grad for t in (q, k, v)]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("B,H,T,hd,slice_bytes,block", [
    (2, 3, 40, 16, 2**30, 16),       # 3 key blocks, the last one short
    (3, 2, 37, 32, 1, 8),            # one batch row per slice, 5 blocks
    (2, 1, 24, 8, 2**30, 128),       # a block taller than T: one block
    (4, 2, 64, 64, 3 * 4 * 2 * 64 * 32 * 2, 32),  # slices of two batch rows
])
def test_gradients_match_fp64_sdpa_as_closely_as_flash(B, H, T, hd, slice_bytes, block):
    q, k, v, do = _inputs(B, H, T, hd)
    _, ref = _grads(lambda *a: F.scaled_dot_product_attention(*(t.double() for t in a), is_causal=True), q, k, v, do)
    flash_out, flash = _grads(lambda *a: F.scaled_dot_product_attention(*a, is_causal=True), q, k, v, do)
    out, ours = _grads(lambda *a: CausalAttention.apply(*a, hd ** -0.5, slice_bytes, block), q, k, v, do)
    torch.testing.assert_close(out, flash_out, rtol=0, atol=0)  # the same flash forward
    for name, g, f, r in zip("qkv", ours, flash, ref):
        assert g.dtype == torch.bfloat16
        # bf16 gradients: within 2x flash's own error and 1 % of the fp64 gradient
        assert _rel(g, r) < max(2 * _rel(f, r), 2**-8) and _rel(g, r) < 1e-2, (name, _rel(g, r), _rel(f, r))


def test_a_wrong_mask_is_caught():
    """The comparison above can fail: a backward that lets queries see later keys (no mask) is far off."""
    q, k, v, do = _inputs(2, 2, 32, 16)
    _, ref = _grads(lambda *a: F.scaled_dot_product_attention(*(t.double() for t in a), is_causal=True), q, k, v, do)
    unmasked = torch.ones(1, dtype=torch.bool)
    real_triu = torch.Tensor.triu
    try:
        torch.Tensor.triu = lambda self, d=0: unmasked.expand_as(self) & False
        _, ours = _grads(lambda *a: CausalAttention.apply(*a, 16 ** -0.5, 2**30, 8), q, k, v, do)
    finally:
        torch.Tensor.triu = real_triu
    assert max(_rel(g, r) for g, r in zip(ours, ref)) > 0.05


def test_compiled_equals_eager():
    q, k, v, do = _inputs(2, 2, 48, 16, seed=3)
    f = lambda *a: CausalAttention.apply(*a, 16 ** -0.5, 2**30, 16)  # noqa: E731
    _, eager = _grads(f, q, k, v, do)
    _, compiled = _grads(torch.compile(f, fullgraph=True), q, k, v, do)
    for a, b in zip(compiled, eager):
        assert _rel(a, b) < 2**-7


def test_used_only_where_it_applies():
    q = torch.zeros(1, 2, 8, 4, dtype=torch.bfloat16, requires_grad=True)
    assert use_matmul_backward(q, q, q) == torch.ops.mkldnn._is_mkldnn_bf16_supported()  # native bf16 only
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU emulates bf16 matmuls: SDPA everywhere")
    assert not use_matmul_backward(q.float(), q.float(), q.float())           # fp32: torch's kernel
    assert not use_matmul_backward(q, q[:, :1], q[:, :1])                     # GQA: fewer kv heads
    assert not use_matmul_backward(q, q, q.float())                           # mixed dtypes
    assert not use_matmul_backward(q[:, :, :1], q[:, :, :1], q[:, :, :1])     # one token
    assert not use_matmul_backward(q.detach(), q.detach(), q.detach())        # nothing to differentiate
    assert use_matmul_backward(q.detach(), q.detach(), q)                     # v alone needs a gradient
    with torch.no_grad():
        assert not use_matmul_backward(q, q, q)


@pytest.mark.parametrize("method", ["vanilla", "step"])
def test_training_with_either_backward_agrees(tmp_path, method):
    """Six bf16 steps of a tiny model (a 2-stage STEP run grows at step 3: its new layers get the
    setting too) with the matmul backward and with torch's flash backward log the same losses, up
    to bf16 rounding; the trainer's switch reaches every attention module."""
    import json

    from conftest import tiny_overrides
    from steplm import config
    from steplm.model.llama import Attention
    from steplm.train.loop import Trainer

    def run(flag):
        extra = {"method": method, "train.max_steps": 6, "train.dtype": "bf16", "train.attention_matmul_backward": flag}
        if method == "step":
            extra.update({"step.n_stages": 2, "step.layers_per_stage": "[2,2]"})
        t = Trainer(config.load(None, tiny_overrides(tmp_path, **extra)), tmp_path / str(flag), progress=False)
        t.fit()
        assert {m.matmul_backward for m in t.model.modules() if isinstance(m, Attention)} == {flag}
        rows = [json.loads(r) for r in (tmp_path / str(flag) / "metrics.jsonl").read_text().splitlines()]
        return torch.tensor([r["loss"] for r in rows if "loss" in r])
    on, off = run(True), run(False)
    assert len(on) == len(off) >= 6  # STEP trains more steps: the same FLOPs as vanilla
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        # emulated bf16: the switch applies nowhere (use_matmul_backward), SDPA runs either way
        assert torch.equal(on, off)
        return
    assert not torch.equal(on, off)  # the two backwards really differ (in rounding)
    torch.testing.assert_close(on, off, rtol=1e-2, atol=0)
