"""Model architecture: shapes, init, HF LlamaForCausalLM logit parity, HF round trip."""
import pytest
import torch

from steplm.model.llama import ModelConfig, build_model, count_params, default_ffn_hidden

transformers = pytest.importorskip("transformers")


def tiny_cfg(**kw):
    base = dict(vocab_size=97, d_model=32, n_layers=3, n_heads=4, max_seq_len=24)
    base.update(kw)
    return ModelConfig(**base)


def test_ffn_default_is_llama_rounding():
    assert default_ffn_hidden(256) == 704  # 8/3·256 = 682.67 -> next multiple of 64
    assert default_ffn_hidden(4096, multiple_of=256) == 11008  # LLaMA-7B's width
    assert ModelConfig(d_model=384).ffn_hidden == 1024


def test_forward_shape_and_param_count():
    cfg = tiny_cfg()
    m = build_model(cfg, seed=0)
    x = torch.randint(0, cfg.vocab_size, (2, 10))
    assert m(x).shape == (2, 10, cfg.vocab_size)
    d, f, V, L = cfg.d_model, cfg.ffn_hidden, cfg.vocab_size, cfg.n_layers
    per_layer = 4 * d * d + 3 * d * f + 2 * d
    c = count_params(m)
    assert c["non_embedding"] == L * per_layer + d
    assert c["embedding"] == 2 * V * d


def test_seeded_init_is_deterministic():
    a, b = build_model(tiny_cfg(), seed=3), build_model(tiny_cfg(), seed=3)
    c = build_model(tiny_cfg(), seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 2}, {"tie_embeddings": True}, {"ffn_hidden": 50}])
def test_logits_match_transformers_llama(tmp_path, kw):
    from steplm.io.hf import export
    from steplm.data.tokenizer import load_tokenizer

    cfg = tiny_cfg(**kw)
    model = build_model(cfg, seed=1).eval()
    with torch.no_grad():  # non-trivial norms so that their weights are exercised
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    tok = load_tokenizer("bpe:300", iter(["hello world " * 50]))
    export(model, tok, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    x = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len))
    with torch.no_grad():
        ours, theirs = model(x), hf(input_ids=x).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    # Wrong weights must be caught: perturb one and the check fails.
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 0.5
        assert (model(x) - theirs).abs().max().item() > 1e-3


def test_load_back_from_hf_dir(tmp_path):
    from steplm.data.tokenizer import load_tokenizer
    from steplm.io.hf import export
    from steplm.io.run_dir import load_hf_dir

    cfg = tiny_cfg(n_kv_heads=2)
    model = build_model(cfg, seed=2).eval()
    tok = load_tokenizer("bpe:300", iter(["the quick brown fox " * 40]))
    export(model, tok, tmp_path)
    back, tok2 = load_hf_dir(tmp_path)
    assert back.config.n_kv_heads == 2 and back.config.n_layers == 3
    x = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(x), back(x))
    assert tok2.encode("the quick fox").ids == tok.encode("the quick fox").ids


def test_kv_cache_decoding_matches_full_forward():
    from steplm.model.llama import KVCache

    cfg = tiny_cfg()
    m = build_model(cfg, seed=0).eval()
    x = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        full = m(x)
        caches = [KVCache() for _ in range(cfg.n_layers)]
        step = [m(x[:, :5], caches)[:, -1]] + [m(x[:, i:i + 1], caches)[:, -1] for i in range(5, 9)]
    assert torch.allclose(torch.stack(step, 1), full[:, 4:], atol=1e-5)


def test_config_problems_name_keys():
    assert any("model.d_model" in p for p in ModelConfig(d_model=30, n_heads=4).problems())
    assert any("model.n_kv_heads" in p for p in ModelConfig(n_heads=4, n_kv_heads=3).problems())
    assert any("model.n_layers" in p for p in ModelConfig(n_layers=0).problems())


def test_every_way_of_building_fills_the_rope_tables():
    """LLaMA built directly, by build_model (meta, then init) and by from_state_dict (meta, then load)
    holds the RoPE tables rope_cache computes, and building on meta imports no torch._dynamo (a
    process that only evaluates or generates would pay ~1.5 s for it)."""
    import subprocess
    import sys

    from steplm.model.llama import LLaMA, from_state_dict, rope_cache

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=24, rope_theta=500.0)
    cos, sin = rope_cache(cfg)
    built = build_model(cfg, seed=1)
    loaded = from_state_dict(cfg, {k: v.clone() for k, v in built.state_dict().items()})
    for m in (LLaMA(cfg), built, loaded):
        assert torch.equal(m.rope_cos, cos) and torch.equal(m.rope_sin, sin)
    code = ("import sys; from steplm.model.llama import ModelConfig, build_model, from_state_dict; "
            "c = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=24); "
            "from_state_dict(c, build_model(c).state_dict()); "
            "sys.exit('torch._dynamo' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
