"""LoRA on frozen linears and the ReLoRA merge-and-reinit."""
import math

import torch
import torch.nn as nn

from steplm.lora import LoRALinear, apply_lora, merge_and_reinit, merged_state_dict
from steplm.model import Block, ModelConfig


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
    from steplm.growth import effective_state
    from steplm.model import build_model
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
