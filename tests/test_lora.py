"""LoRA on frozen linears and the ReLoRA merge-and-reinit."""
import math

import pytest
import torch
import torch.nn as nn

from steplm.passes.lora import LoRALinear, apply_lora, merge_and_reinit, merged_state_dict
from steplm.model.llama import Block, ModelConfig


def test_init_and_zero_update():
    base = nn.Linear(16, 8, bias=False)
    lin = LoRALinear(base, rank=4, alpha=8.0)
    assert lin.weight.dtype == torch.bfloat16 and not lin.weight.requires_grad
    assert torch.equal(lin.lora_B, torch.zeros(8, 4)) and lin.lora_A.abs().sum() > 0
    bound = 1 / math.sqrt(16)  # kaiming_uniform(a=sqrt(5)) on fan_in 16
    assert lin.lora_A.abs().max() <= bound
    assert lin.scaling == 2.0
    x = torch.randn(3, 16)
    assert torch.allclose(lin(x), x @ base.weight.detach().to(torch.bfloat16).float().T)


def test_forward_includes_scaled_update():
    lin = LoRALinear(nn.Linear(6, 5, bias=False), rank=2, alpha=4.0)
    with torch.no_grad():
        lin.lora_B.normal_()
    x = torch.randn(4, 6)
    expected = x @ lin.weight.float().T + 2.0 * (x @ lin.lora_A.T @ lin.lora_B.T)
    assert torch.allclose(lin(x), expected, atol=1e-5)


def _reference_lora(x, lin):
    """The adapter as plain autograd composes it: F.linear three times, in the autocast dtype if on."""
    F = torch.nn.functional
    dt = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    xd = x.to(dt)
    b = None if lin.bias is None else lin.bias.to(dt)
    base = F.linear(xd, lin.weight.to(dt), b)
    return base + F.linear(F.linear(xd, lin.lora_A.to(dt)), lin.lora_B.to(dt)) * lin.scaling


@pytest.mark.parametrize("shape,bias,autocast,compiled", [
    ((4, 6), False, False, False), ((2, 3, 6), True, False, False), ((2, 5, 6), False, True, False),
    ((3, 7, 6), True, True, False), ((2, 4, 6), False, True, True), ((1, 6), True, False, True)])
def test_hand_written_backward_equals_autograd(shape, bias, autocast, compiled):
    """LoRALinear's own backward gives the input, A and B gradients that autograd derives for the
    plain composition, in fp32 and in bf16 autocast, with and without a bias and torch.compile."""
    torch.manual_seed(0)
    lin = LoRALinear(nn.Linear(6, 5, bias=bias), rank=3, alpha=6.0, frozen_dtype=torch.float32 if not autocast
                     else torch.bfloat16)
    with torch.no_grad():
        lin.lora_B.normal_()
    x = torch.randn(*shape, requires_grad=True)
    probe = torch.randn(*shape[:-1], 5)
    fwd = torch.compile(lin) if compiled else lin
    grads = []
    for f in (fwd, lambda v: _reference_lora(v, lin)):
        x.grad = lin.lora_A.grad = lin.lora_B.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = f(x)
        assert y.dtype == (torch.bfloat16 if autocast else torch.float32) and y.shape == (*shape[:-1], 5)
        (y.float() * probe).sum().backward()
        grads.append([y.detach().float(), x.grad.clone(), lin.lora_A.grad.clone(), lin.lora_B.grad.clone()])
        assert x.grad.dtype == lin.lora_A.grad.dtype == lin.lora_B.grad.dtype == torch.float32
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    for got, want, name in zip(*grads, ("y", "x.grad", "A.grad", "B.grad")):
        assert torch.allclose(got, want, **tol), (name, (got - want).abs().max())
    assert not lin.weight.requires_grad and lin.weight.grad is None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        inference = lin(x)  # the no-grad path (evaluation, decoding) computes the same y
    assert torch.allclose(inference.float(), grads[1][0], **tol)


@pytest.mark.parametrize("out,inp,rank,rho", [(256, 256, 16, 1e-3), (384, 128, 32, 1e-2), (128, 384, 8, 1e-1)])
def test_bf16_merge_is_as_close_to_the_exact_sum_as_the_fp32_one(out, inp, rank, rho):
    """The merged weight of a frozen bf16 W, formed in bf16 (_merged's fast form) and in fp32 then
    rounded: against W + s·B·A in float64, the mean error within 5 % of the fp32 form's, for updates
    from 1e-3 to 1e-1 of W's rms; and every element within one bf16 step of the exact value plus what
    rounding A and B to bf16 can move s·B·A (2^-8 of s·|B|·|A|, both roundings at their worst)."""
    from steplm.passes.lora import _merged

    torch.manual_seed(0)
    W = (torch.randn(out, inp) * 0.02).bfloat16()
    A, B, s = torch.randn(rank, inp) / inp ** 0.5, torch.randn(out, rank), 2.0
    B *= rho * W.float().pow(2).mean().sqrt() / (s * B @ A).pow(2).mean().sqrt()
    exact = W.double() + s * (B.double() @ A.double())
    fast = _merged(W, A, B, s, torch.bfloat16)
    slow = torch.addmm(W.float(), B, A, alpha=s).to(torch.bfloat16)
    assert fast.dtype == slow.dtype == torch.bfloat16 and fast.shape == (out, inp)
    ulp = exact.abs().clamp_min(1e-30).log2().floor().exp2() * 2.0 ** -7  # one bf16 step at each value
    inputs = 2.0 ** -8 * s * (B.double().abs() @ A.double().abs())  # A, B rounded to bf16: 2^-9 each
    assert ((fast.double() - exact).abs() <= ulp + inputs).all()
    err_fast, err_slow = ((m.double() - exact).abs().mean().item() for m in (fast, slow))
    assert err_fast <= 1.05 * err_slow
    assert torch.equal(_merged(W.float(), A, B, s, torch.float32), torch.addmm(W.float(), B, A, alpha=s))


@pytest.mark.parametrize("n,d_in,d_out,rank", [(512, 64, 64, 4), (256, 32, 96, 8), (300, 48, 16, 2)])
def test_forward_saves_only_its_input_and_the_rank_sized_product(n, d_in, d_out, rank):
    """What one adapted linear keeps for its backward is its input (N, in), x·Aᵀ (N, r) and the
    parameters, counted by storage: not the (N, out + r) product that x·Aᵀ is sliced from."""
    torch.manual_seed(0)
    lin = LoRALinear(nn.Linear(d_in, d_out, bias=False), rank=rank, alpha=2.0 * rank)
    x = torch.randn(n, d_in, dtype=torch.bfloat16, requires_grad=True)
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    params = sum(p.untyped_storage().nbytes() for p in (lin.weight, lin.lora_A, lin.lora_B))
    assert sum(kept.values()) == x.untyped_storage().nbytes() + n * rank * 2 + params
    y.float().sum().backward()
    assert lin.lora_A.grad is not None


def test_merge_and_reinit_moves_update_and_zeroes_moments():
    torch.manual_seed(0)
    block = Block(ModelConfig(vocab_size=10, d_model=16, n_layers=1, n_heads=2))
    apply_lora(block, rank=4, alpha=4.0, frozen_dtype=torch.float32)  # fp32 base: exact merge check
    params = [p for n, p in block.named_parameters() if "lora_" in n]
    assert all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in block.named_parameters() if "lora_" not in n)
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = torch.randn(2, 5, 16)
    cos, sin = torch.ones(5, 8), torch.zeros(5, 8)
    for _ in range(3):
        block(x, cos, sin).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    q = block.self_attn.q_proj
    expected = q.weight.detach().clone() + q.delta().detach()
    out_before = block(x, cos, sin).detach()
    A_before = q.lora_A.detach().clone()
    assert opt.state[q.lora_A]["exp_avg"].abs().sum() > 0
    n = merge_and_reinit(block, opt, torch.Generator().manual_seed(1))
    assert n == 7
    assert torch.allclose(q.weight, expected, atol=1e-6)
    assert torch.equal(q.lora_B, torch.zeros_like(q.lora_B)) and not torch.equal(q.lora_A, A_before)
    for p in params:
        assert torch.count_nonzero(opt.state[p]["exp_avg"]) == 0
        assert torch.count_nonzero(opt.state[p]["exp_avg_sq"]) == 0
    assert torch.allclose(block(x, cos, sin), out_before, atol=1e-5)  # function unchanged by the merge


def test_prune_keeps_largest_moments():
    block = Block(ModelConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=2))
    apply_lora(block, rank=2, alpha=2.0)
    p = block.mlp.up_proj.lora_A
    opt = torch.optim.AdamW([p])
    opt.state[p] = {"exp_avg": torch.arange(1.0, 17.0).view(2, 8), "exp_avg_sq": torch.ones(2, 8)}
    merge_and_reinit(block, opt, prune_ratio=0.75)
    assert torch.count_nonzero(opt.state[p]["exp_avg"]) == 4


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.9])
def test_pruned_reset_zeroes_both_moments_at_the_same_positions(ratio):
    """lora.reset_prune keeps both Adam moments at the 1 - ratio of positions with the largest first
    moment and zeroes both elsewhere, the second moment ordered otherwise than the first."""
    block = Block(ModelConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=2))
    apply_lora(block, rank=2, alpha=2.0)
    p = block.mlp.up_proj.lora_A
    opt = torch.optim.AdamW([p])
    g = torch.Generator().manual_seed(0)
    m = torch.randn(p.shape, generator=g)
    v = torch.rand(p.shape, generator=g) + 0.1  # all kept positions have v > 0
    opt.state[p] = {"exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    merge_and_reinit(block, opt, prune_ratio=ratio)
    k = int(m.numel() * ratio)
    keep = torch.zeros(m.numel(), dtype=torch.bool)
    keep[m.abs().flatten().argsort()[k:]] = True  # the largest |m|, distinct with probability 1
    keep = keep.view(m.shape)
    assert torch.equal(opt.state[p]["exp_avg"], torch.where(keep, m, 0.0))
    assert torch.equal(opt.state[p]["exp_avg_sq"], torch.where(keep, v, 0.0))


@pytest.mark.parametrize("ratio", [None, 0.5, 0.9])
def test_update_after_a_reset_stays_within_adams_bound(ratio):
    """After a reset, plain or pruned, every adapter element's Adam step stays within Kingma & Ba's
    bound: with m, v sums of the same gradients, |m| <= (1-b1)/sqrt(1-b2)/sqrt(1-b1^2/b2)·sqrt(v)
    (Cauchy-Schwarz), so |update| <= lr·that/(1-b1^t) after bias correction. A kept m over a zeroed v
    (the first step after a reset leaves lora_A's gradient zero, lora_B being zero) breaks it."""
    torch.manual_seed(0)
    block = Block(ModelConfig(vocab_size=10, d_model=16, n_layers=1, n_heads=2))
    apply_lora(block, rank=4, alpha=8.0)
    params = [p for n, p in block.named_parameters() if "lora_" in n]
    lr, (b1, b2) = 1e-2, (0.9, 0.95)
    opt = torch.optim.AdamW(params, lr=lr, betas=(b1, b2), weight_decay=0.0)
    x = torch.randn(2, 5, 16)
    cos, sin = torch.ones(5, 8), torch.zeros(5, 8)

    def step():
        block(x, cos, sin).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    for _ in range(3):
        step()
    merge_and_reinit(block, opt, torch.Generator().manual_seed(1), prune_ratio=ratio)
    before = [p.detach().clone() for p in params]
    step()
    t = int(opt.state[params[0]]["step"])
    bound = lr * (1 - b1) / math.sqrt(1 - b2) / math.sqrt(1 - b1 ** 2 / b2) / (1 - b1 ** t)
    worst = max((p.detach() - p0).abs().max().item() for p, p0 in zip(params, before))
    assert 0 < worst <= bound * (1 + 1e-5), (worst, bound)


def test_merged_state_dict_drops_adapters():
    block = Block(ModelConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=2))
    wrapper = nn.Module()
    wrapper.block = block
    apply_lora(block, rank=2, alpha=2.0)
    with torch.no_grad():
        block.mlp.down_proj.lora_B.fill_(0.1)
    sd = merged_state_dict(wrapper)
    assert not any("lora_" in k for k in sd) and all(v.dtype == torch.float32 for v in sd.values())
    assert torch.allclose(sd["block.mlp.down_proj.weight"], block.mlp.down_proj.merged_weight())


def test_biases_survive_freezing_growth_and_export():
    from steplm.passes.growth import effective_state
    from steplm.model.llama import build_model
    cfg = ModelConfig(vocab_size=10, d_model=16, n_layers=2, n_heads=2, max_seq_len=8, attention_bias=True,
                      mlp_bias=True)
    model = build_model(cfg, seed=0).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 10, (2, 8))
    with torch.no_grad():
        want = model(x)
        for block in model.model.layers:
            apply_lora(block, rank=2, alpha=2.0, frozen_dtype=torch.float32)
        assert torch.allclose(model(x), want, atol=1e-6)  # frozen linears keep their biases (B = 0 at start)
        for block in model.model.layers:
            for m in block.modules():
                if isinstance(m, LoRALinear):
                    m.lora_B.normal_()
                    m.merge()
                    m.lora_B.zero_()
        assert model.model.layers[0].self_attn.q_proj.bias is not None
        assert not torch.equal(model(x), want)  # the merged updates changed the weights, not the biases
    state = merged_state_dict(model)
    bias_keys = {k for k in before if k.endswith(".bias")}
    assert len(bias_keys) == 2 * 7 and bias_keys <= set(state)
    assert all(torch.equal(state[k], before[k]) for k in bias_keys)
    block_state = effective_state(model.model.layers[0])
    assert torch.equal(block_state["mlp.up_proj.bias"], before["model.layers.0.mlp.up_proj.bias"])


# ---------------------------------------------------------------------------- merge precision
import numpy as np  # noqa: E402

from steplm.passes.lora import round_to  # noqa: E402


def bf16_brackets(x32: np.ndarray):
    """The bf16 values just below and above each fp32 value in magnitude, by bit arithmetic in numpy
    (independent of torch's conversion)."""
    bits = x32.view(np.uint32)
    low = (bits & np.uint32(0xFFFF0000)).view(np.float32)
    high = ((bits & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32)
    exact = (bits & np.uint32(0xFFFF)) == 0
    return low.astype(np.float64), np.where(exact, low, high.astype(np.float64)), exact


def brute_nearest(x32: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even to bf16, element by element."""
    low, high, exact = bf16_brackets(x32)
    x = x32.astype(np.float64)
    d_low, d_high = np.abs(x - low), np.abs(high - x)
    low_is_even = ((low.astype(np.float32).view(np.uint32) >> 16) & 1) == 0
    pick_low = exact | (d_low < d_high) | ((d_low == d_high) & low_is_even)
    return np.where(pick_low, low, high)


def lora_at_ratio(rho: float, seed: int = 0) -> LoRALinear:
    """A bf16-based LoRALinear whose update has rms(update)/rms(W) = rho."""
    torch.manual_seed(seed)
    lin = LoRALinear(nn.Linear(64, 48, bias=False), rank=4, alpha=4.0)
    with torch.no_grad():
        lin.lora_B.normal_()
        w_rms, u_rms = lin.weight.float().pow(2).mean().sqrt(), lin.delta().pow(2).mean().sqrt()
        lin.lora_B.mul_(rho * w_rms / u_rms)
    return lin


@pytest.mark.parametrize("rho", [1e-4, 1e-3, 3e-3, 1e-2])
def test_nearest_merge_and_its_kept_share_match_brute_force(rho):
    lin = lora_at_ratio(rho)
    w, u = lin.weight.float().numpy().astype(np.float64), lin.delta().detach().numpy().astype(np.float64)
    x32 = (lin.weight.float() + lin.delta()).detach().numpy()  # the fp32 sum the merge rounds
    expected = brute_nearest(x32)
    share = float(((expected - w) * u).sum() / (u * u).sum())
    holder = nn.Module()
    holder.lin = lin
    stats = {}
    merge_and_reinit(holder, stats=stats)
    assert np.array_equal(lin.weight.float().numpy().astype(np.float64), expected)
    assert stats["kept_share"] == pytest.approx(share, rel=1e-5, abs=1e-6)
    assert stats["update_rms_ratio"] == pytest.approx(rho, rel=1e-3)
    # The measurements: 1e-4 keeps ~6 %, 1e-3 ~55 %, 3e-3 ~93 %, 1e-2 all of it.
    lo, hi = {1e-4: (0.0, 0.2), 1e-3: (0.35, 0.75), 3e-3: (0.85, 0.99), 1e-2: (0.99, 1.01)}[rho]
    assert lo < share < hi


def test_stochastic_merge_is_unbiased_over_seeds():
    """At rho = 1e-3, where round-to-nearest keeps about half the update, stochastic rounding's mean
    applied update over S seeds matches the fp32 update: the kept share within 5 standard errors,
    and a chi-square over every element. The tolerances come from each element's Bernoulli variance
    spacing²·p·(1-p), where p is its distance from the bf16 value below as a share of the spacing."""
    lin = lora_at_ratio(1e-3)
    w0 = lin.weight.detach().clone()
    w, u = w0.float().numpy().astype(np.float64), lin.delta().detach().numpy().astype(np.float64)
    x32 = (w0.float() + lin.delta()).detach().numpy()
    low, high, exact = bf16_brackets(x32)
    target = x32.astype(np.float64) - w  # what an unbiased rounding applies on average
    spacing = np.abs(high - low)
    p = np.where(exact, 0.0, np.abs(x32 - low) / np.where(exact, 1.0, spacing))
    var = spacing ** 2 * p * (1 - p)
    S = 400
    applied = np.empty((S,) + w.shape)
    shares = np.empty(S)
    for seed in range(S):
        with torch.no_grad():
            lin.weight.copy_(w0)
        dot, uu, _ = lin.merge("stochastic", torch.Generator().manual_seed(seed)).tolist()
        applied[seed] = lin.weight.float().numpy() - w
        shares[seed] = dot / uu
    uu = (u * u).sum()
    expected_share = (target * u).sum() / uu
    se_share = math.sqrt((u * u * var).sum()) / uu / math.sqrt(S)
    assert abs(shares.mean() - expected_share) < 5 * se_share, (shares.mean(), expected_share, se_share)
    assert abs(expected_share - 1) < 1e-3  # and that target is the update itself, up to fp32 addition
    assert np.all(applied[:, exact] == target[exact])  # representable sums are never moved
    n = int((~exact).sum())
    chi2 = (((applied.mean(0) - target)[~exact]) ** 2 / (var[~exact] / S)).sum()
    assert chi2 < n + 6 * math.sqrt(2 * n), (chi2, n)
    # The same test rejects round-to-nearest by a wide margin, so it can fail.
    with torch.no_grad():
        lin.weight.copy_(w0)
    dot, uu_t, _ = lin.merge("nearest").tolist()
    assert abs(dot / uu_t - expected_share) > 50 * se_share


def test_round_to_keeps_sign_and_range():
    x = torch.tensor([1.0 + 2**-10, -(1.0 + 2**-10), 3e38, -0.0, 1e-40])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        y = round_to(x, torch.bfloat16, "stochastic", g).float()
        assert y[0] in (1.0, 1.0 + 2**-7) and y[1] in (-1.0, -(1.0 + 2**-7))
        assert torch.isfinite(y[:2]).all() and y[3] == 0 and y[4] >= 0
    assert torch.equal(round_to(x, torch.float32, "stochastic", g), x)  # only bf16 targets are randomised
