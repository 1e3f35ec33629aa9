"""HF Llama import/export: logit parity with transformers for every config feature steplm implements,
one-line refusals for the ones it does not, special tokens from the model directory, sharded/bf16
export, and the zero-shot boundary-token case.

Models are tiny random ``LlamaForCausalLM``s saved with ``save_pretrained``; expected logits always
come from transformers, never from steplm."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from steplm.cli import main
from steplm.io.hf import CHECKED, IMPLEMENTED, NO_EFFECT, from_hf_config, to_hf_config
from steplm.io.run_dir import load_pretrained
from steplm.model.llama import ModelConfig

from conftest import ROOT, shared

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
        "To be, or not to be, that is the question. ") * 40
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


# ---------------------------------------------------------------------------- builders
def gpt2_style_tokenizer():
    """A byte-level BPE whose only special token is <|endoftext|> (steplm's own convention)."""
    from steplm.data.tokenizer import load_tokenizer
    return load_tokenizer("bpe:300", iter([TEXT]))


def llama_style_tokenizer():
    """A Metaspace BPE with <unk>/<s>/</s>, whose template prepends <s> (as Llama 2 and Mistral's do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def save_tokenizer(tok, path, llama: bool):
    names = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>") if llama else \
        dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    PreTrainedTokenizerFast(tokenizer_object=tok, **names).save_pretrained(str(path))


def make_hf_dir(path, llama_tok: bool = False, dtype=None, legacy_rope: dict | None = None, seed: int = 0,
                save_kw: dict | None = None, **cfg_kw):
    """Save a random LlamaForCausalLM (non-trivial norms and biases) and a tokenizer to ``path``."""
    tok = llama_style_tokenizer() if llama_tok else gpt2_style_tokenizer()
    eos = tok.token_to_id("</s>" if llama_tok else "<|endoftext|>")
    bos = tok.token_to_id("<s>" if llama_tok else "<|endoftext|>")
    kw = dict(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64, initializer_range=0.1, bos_token_id=bos,
              eos_token_id=eos)
    kw.update(cfg_kw)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(str(path), **(save_kw or {}))
    save_tokenizer(tok, path, llama_tok)
    if legacy_rope is not None:  # rewrite config.json in the pre-v5 layout: rope_theta + rope_scaling
        cfg = json.loads((path / "config.json").read_text())
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope["rope_theta"]
        cfg["rope_scaling"] = legacy_rope
        (path / "config.json").write_text(json.dumps(cfg))
    return tok


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def hf_logits(path, x):
    hf = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids=x).logits


def ids(vocab, T=64, B=2, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "steplm", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


# ---------------------------------------------------------------------------- parity, one row per feature
def _without_rope_scaling(m):
    return _rebuilt(m, rope_scaling=None)


def _rebuilt(m, **changes):
    from steplm.model.llama import from_state_dict
    return from_state_dict(dataclasses.replace(m.config, **changes), dict(m.state_dict()))


def _zero_biases(m):
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
    return m


def _embedding_as_head(m):
    with torch.no_grad():
        m.lm_head.weight.copy_(m.model.embed_tokens.weight)
    return m


def _bump_weight(m):
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[0, 0] += 0.5
    return m


# feature -> (make_hf_dir kwargs, what ignoring the feature would look like)
FEATURES = {
    "plain": ({}, _bump_weight),
    "gqa_rope_theta_5e5": ({"num_key_value_heads": 2, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
                           lambda m: _rebuilt(m, rope_theta=1e4)),
    "rms_norm_eps": ({"rms_norm_eps": 0.5}, lambda m: _rebuilt(m, norm_eps=1e-6)),
    "rope_linear": ({"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}},
                    _without_rope_scaling),
    "rope_linear_legacy": ({"legacy_rope": {"type": "linear", "factor": 4.0}}, _without_rope_scaling),
    "rope_llama3": ({"rope_parameters": {**LLAMA3, "rope_theta": 5e5}}, _without_rope_scaling),
    "rope_llama3_legacy": ({"legacy_rope": LLAMA3, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
                           _without_rope_scaling),
    "rope_yarn": ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                       "rope_theta": 1e4}}, _without_rope_scaling),
    "head_dim_64_hidden_128": ({"hidden_size": 128, "num_attention_heads": 4, "head_dim": 64}, _bump_weight),
    "attention_bias": ({"attention_bias": True}, _zero_biases),
    "mlp_bias": ({"mlp_bias": True}, _zero_biases),
    "tied": ({"tie_word_embeddings": True}, _bump_weight),
    "bf16_file": ({"dtype": torch.bfloat16}, _bump_weight),
    "fp16_file": ({"dtype": torch.float16}, _bump_weight),
    "sharded_safetensors": ({"save_kw": {"max_shard_size": "100KB"}}, _bump_weight),
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_logit_parity_with_transformers(tmp_path, feature):
    kw, ignore = FEATURES[feature]
    tok = make_hf_dir(tmp_path, **kw)
    if feature == "sharded_safetensors":
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    p = load_pretrained(tmp_path)
    x = ids(tok.get_vocab_size())
    theirs = hf_logits(tmp_path, x)
    with torch.no_grad():
        ours = p.model(x)
    assert theirs.abs().max() > 0.1  # logits of a size where a 1e-5 tolerance means something
    assert (ours - theirs).abs().max().item() <= 2e-5, feature
    with torch.no_grad():  # the check can fail: dropping the feature (or a wrong weight) is caught
        assert (ignore(p.model)(x) - theirs).abs().max().item() > 1e-3, feature


@pytest.mark.parametrize("change", [
    {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
    {"rope_parameters": {"rope_type": "dynamic", "factor": 8.0, "rope_theta": 5e5}},
    {"rope_scaling": {"type": "dynamic", "factor": 4.0}},
    {"pretraining_tp": 2},
    {"pretraining_tp": 4},
    {"sliding_window": 16},
    {"sliding_window": 4, "pretraining_tp": 2},
], ids=lambda c: json.dumps(c))
def test_keys_transformers_computes_without_are_loaded_as_it_loads_them(tmp_path, capsys, change):
    """Loaded, not refused: dynamic (NTK) RoPE rescales only past max_position_embeddings, which no
    steplm sequence reaches; transformers 5's LlamaForCausalLM does not read pretraining_tp or
    sliding_window. Full-length logits equal transformers' for the same file (sliding_window with a
    one-line warning), and a sequence of max_position_embeddings tokens is accepted."""
    tok = make_hf_dir(tmp_path)
    edit_config(tmp_path, **change)
    capsys.readouterr()
    p = load_pretrained(tmp_path)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == ("sliding_window" in change), err
    x = ids(tok.get_vocab_size(), T=p.config.max_seq_len)
    theirs = hf_logits(tmp_path, x)
    with torch.no_grad():
        assert (p.model(x) - theirs).abs().max().item() <= 2e-5
    if "rope_parameters" in change or "rope_scaling" in change:
        assert p.config.rope_scaling["rope_type"] == "dynamic"
        assert to_hf_config(p.config)["rope_parameters"]["rope_type"] == "dynamic"  # kept on export


def test_tied_config_with_own_lm_head_uses_the_file_and_warns(tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    tok = make_hf_dir(tmp_path, tie_word_embeddings=True)
    state = load_file(str(tmp_path / "model.safetensors"))
    assert "lm_head.weight" not in state
    state["lm_head.weight"] = torch.randn(state["model.embed_tokens.weight"].shape) * 0.1
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    p = load_pretrained(tmp_path)
    err = capsys.readouterr().err
    assert "tie_word_embeddings" in err and "lm_head.weight" in err and len(err.strip().splitlines()) == 1
    assert not p.config.tie_embeddings
    x = ids(tok.get_vocab_size())
    theirs = hf_logits(tmp_path, x)
    with torch.no_grad():
        assert (p.model(x) - theirs).abs().max().item() <= 2e-5
        assert (_embedding_as_head(p.model)(x) - theirs).abs().max().item() > 1e-3


def test_tied_config_with_equal_lm_head_stays_tied(tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    make_hf_dir(tmp_path, tie_word_embeddings=True)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    p = load_pretrained(tmp_path)
    assert capsys.readouterr().err == ""
    assert p.config.tie_embeddings and p.model.lm_head.weight is p.model.model.embed_tokens.weight


def test_pytorch_bin_is_loaded_with_weights_only(tmp_path):
    tok = make_hf_dir(tmp_path)
    from safetensors.torch import load_file
    torch.save(load_file(str(tmp_path / "model.safetensors")), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    x = ids(tok.get_vocab_size())
    with torch.no_grad():
        assert (load_pretrained(tmp_path).model(x) - hf_logits(tmp_path, x)).abs().max().item() <= 2e-5


def test_every_llama_config_field_is_classified():
    """A new LlamaConfig field in transformers fails this until import implements or refuses it."""
    base = {f.name for f in dataclasses.fields(transformers.PreTrainedConfig)}
    own = {f.name for f in dataclasses.fields(LlamaConfig)} - base
    assert own <= IMPLEMENTED | CHECKED | NO_EFFECT, own - (IMPLEMENTED | CHECKED | NO_EFFECT)


@pytest.mark.parametrize("layout", [
    {"rope_theta": 5e5, "rope_scaling": LLAMA3},
    {"rope_scaling": {"type": "linear", "factor": 4.0}},
    {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1234.0}},
    {"rope_theta": 99.0, "rope_parameters": {"rope_type": "linear", "factor": 4.0}},
    {"rope_theta": 99.0, "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1234.0}},
    {"rope_theta": 99.0, "rope_scaling": {**LLAMA3, "factor": 2.0},
     "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1234.0}},
    {"rope_scaling": {k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"}},
    {"rope_scaling": LLAMA3, "original_max_position_embeddings": 32},
    {"rope_scaling": None, "rope_theta": 5.0},
    {},
])
def test_rope_layouts_read_as_transformers_reads_them(layout):
    d = {"model_type": "llama", "vocab_size": 10, "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 64, **layout}
    hf = LlamaConfig.from_dict(json.loads(json.dumps(d)))
    hf.standardize_rope_params()  # as transformers' RoPE functions do before computing
    ref = dict(hf.rope_parameters)
    ours = from_hf_config(d)
    assert ours.rope_theta == ref.pop("rope_theta")
    ref.pop("type", None)
    if ref["rope_type"] == "default":
        assert ours.rope_scaling is None
    else:
        assert ours.rope_scaling == ref


# ---------------------------------------------------------------------------- refusals
def _bad_pickle(path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))
    (path / "model.safetensors").unlink()
    with open(path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": Evil()}, f)


def _extra_bias(path):
    from safetensors.torch import load_file, save_file
    state = load_file(str(path / "model.safetensors"))
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


REFUSED = [
    ("hidden_act", lambda p: edit_config(p, hidden_act="gelu"), "hidden_act"),
    ("rope_longrope", lambda p: edit_config(p, rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8,
                                                             "long_factor": [2.0] * 8}), "rope_type"),
    ("pretraining_tp_zero", lambda p: edit_config(p, pretraining_tp=0), "pretraining_tp"),
    ("pretraining_tp_string", lambda p: edit_config(p, pretraining_tp="2"), "pretraining_tp"),
    ("attention_dropout", lambda p: edit_config(p, attention_dropout=0.1), "attention_dropout"),
    ("partial_rotary_factor", lambda p: edit_config(p, partial_rotary_factor=0.5), "partial_rotary_factor"),
    ("quantization_config", lambda p: edit_config(p, quantization_config={"quant_method": "bitsandbytes"}),
     "quantization_config"),
    ("model_type", lambda p: edit_config(p, model_type="mistral"), "model_type"),
    ("unsafe_pickle", _bad_pickle, "weights_only"),
    ("unexpected_tensor", _extra_bias, "model.layers.0.self_attn.q_proj.bias"),
    ("eos_not_in_vocab", lambda p: (p / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eot>"})),
     "eos_token"),
    ("rope_theta_nan", lambda p: edit_config(p, rope_parameters={"rope_type": "default", "rope_theta": float("nan")}),
     "rope_theta"),
    ("rope_theta_inf", lambda p: edit_config(p, rope_parameters={"rope_type": "default", "rope_theta": float("inf")}),
     "rope_theta"),
    ("rope_theta_nan_yarn", lambda p: edit_config(p, rope_parameters={"rope_type": "yarn", "factor": 2.0,
                                                                      "rope_theta": float("nan")}), "rope_theta"),
    # yarn's optional keys, which transformers reads (a string there was a transformers traceback)
    *[(f"yarn_{k}_{v!r}", lambda p, k=k, v=v: edit_config(p, rope_parameters={
        "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32, "rope_theta": 1e4, k: v}),
       f"yarn's {k}")
      for k, v in [("beta_fast", "32"), ("beta_slow", [1]), ("mscale", float("nan")), ("mscale_all_dim", True),
                   ("attention_factor", 0.0), ("attention_factor", "1"), ("truncate", "no"), ("truncate", 1)]],
    # a legacy rope_scaling's problem names rope_scaling, the field the file holds
    ("legacy_rope_scaling_factor", lambda p: edit_config(p, rope_scaling={"type": "linear", "factor": 0.5}),
     "config.json rope_scaling"),
]


@pytest.mark.parametrize("name,breaker,needle", REFUSED, ids=[r[0] for r in REFUSED])
def test_refusal_is_one_line_exit_2(tmp_path, name, breaker, needle):
    model_dir = tmp_path / "m"
    make_hf_dir(model_dir)
    breaker(model_dir)
    (tmp_path / "t.txt").write_text(TEXT)
    res = run_cli("eval", str(model_dir), "--data", str(tmp_path / "t.txt"), "--max-tokens", "64")
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert needle in lines[0], lines[0]
    assert "unpickled!" not in res.stdout + res.stderr


# ---------------------------------------------------------------------------- special tokens
def test_special_tokens_come_from_the_directory(tmp_path):
    from steplm.io.special_tokens import read_special_tokens
    tok = make_hf_dir(tmp_path, llama_tok=True)
    s = read_special_tokens(tmp_path, tok)
    assert (s.eos_id, s.bos_id) == (tok.token_to_id("</s>"), tok.token_to_id("<s>"))
    assert s.stop_ids == (s.eos_id,) and s.prefix_id == s.bos_id
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, s.eos_id, 9]}))
    assert read_special_tokens(tmp_path, tok).stop_ids == (7, s.eos_id, 9)
    (tmp_path / "tokenizer_config.json").unlink()  # no tokenizer file names EOS: generation_config's first id
    assert read_special_tokens(tmp_path, tok).eos_id == 7


def test_eval_with_a_llama_tokenizer_matches_transformers(tmp_path, capsys):
    make_hf_dir(tmp_path / "m", llama_tok=True)
    wiki = str(shared("wikitext2/valid.txt"))
    out = {}
    for backend in ("steplm", "transformers"):
        assert main(["eval", str(tmp_path / "m"), "--data", wiki, "--max-tokens", "1024", "--json",
                     "--backend", backend]) == 0
        out[backend] = json.loads(capsys.readouterr().out)
    assert out["steplm"]["tokens"] == out["transformers"]["tokens"] >= 1000
    assert out["steplm"]["loss"] == pytest.approx(out["transformers"]["loss"], rel=1e-5)


def _relabel(path, a: int, b: int):
    """Swap token ids a and b in the embedding and the head: the same model over relabelled tokens."""
    from safetensors.torch import load_file, save_file
    state = load_file(str(path / "model.safetensors"))
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        w = state[k]
        w[[a, b]] = w[[b, a]]
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_generation_stops_at_the_models_eos_like_transformers(tmp_path, capsys):
    d = tmp_path / "m"
    tok = make_hf_dir(d, llama_tok=True)
    eos = tok.token_to_id("</s>")
    prompt = tok.encode("The quick brown fox").ids
    hf = LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    free = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None)[0, len(prompt):]
    k = next(i for i in range(2, 10) if int(free[i]) not in {*map(int, free[:i]), *prompt, eos})
    _relabel(d, int(free[k]), eos)  # now the greedy k-th token is </s>
    hf = LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt):].tolist()
    assert want[-1] == eos and len(want) == k + 1  # transformers stops at the model's EOS
    assert main(["generate", str(d), "--prompt", "The quick brown fox", "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == tok.decode(want[:-1])
    # several EOS ids in generation_config.json: stop at whichever comes first
    gen = json.loads((d / "generation_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [eos, want[1]]}))
    hf = LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    want2 = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt):].tolist()
    assert want2 == want[:2]
    assert main(["generate", str(d), "--prompt", "The quick brown fox", "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == tok.decode(want[:1])


def test_sft_and_mt_bench_with_a_llama_tokenizer(tmp_path, capsys):
    from steplm.train.sft import build_example
    from steplm.io.special_tokens import read_special_tokens
    d = tmp_path / "m"
    tok = make_hf_dir(d, llama_tok=True, max_position_embeddings=256)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    ex_ids, labels = build_example(tok, {"instruction": "Say hi.", "input": "", "output": "hi"}, eos, 256)
    assert ex_ids[0] == bos and ex_ids[-1] == eos == labels[-1]  # BOS from the template, response ends in </s>
    out = tmp_path / "sft"
    assert main(["sft", str(d), "--data", str(shared("alpaca/seed_tasks.jsonl")), "--out", str(out), "--limit", "4",
                 "--epochs", "1", "--batch-size", "4", "--quiet"]) == 0
    capsys.readouterr()
    s = read_special_tokens(out, tok)
    assert (s.eos_id, s.bos_id, s.stop_ids) == (eos, bos, (eos,))
    answers = tmp_path / "answers.jsonl"
    assert main(["mt-bench", str(out), "--questions", str(shared("eval/mt_bench/question.jsonl")), "--out",
                 str(answers), "--limit", "1", "--max-new-tokens", "3"]) == 0
    assert len(json.loads(answers.read_text())["choices"][0]["turns"]) == 2
    assert main(["export", str(out), "--to", str(tmp_path / "hf")]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert (hf_tok.eos_token, hf_tok.bos_token) == ("</s>", "<s>")


# ---------------------------------------------------------------------------- zero-shot boundary token
def test_a_choice_swallowed_by_the_boundary_token_is_still_scored():
    from tokenizers import Tokenizer, models

    from steplm.eval import tasks
    from steplm.model.llama import build_model
    vocab = {"x": 0, "y": 1, "xy": 2, "z": 3, "<|endoftext|>": 4}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("x", "y")]))

    def enc(s):
        return tok.encode(s, add_special_tokens=False).ids
    assert enc("x") == [0] and enc("xy") == [2]  # "y" after context "x" merges into one token
    assert tasks.encode_pair(enc, "x", "y", 4) == ([4], [2])
    assert tasks.encode_pair(enc, "zx", "y", 4) == ([3], [2])
    model = build_model(ModelConfig(vocab_size=5, d_model=32, n_layers=1, n_heads=2, max_seq_len=8), seed=0).eval()
    (ll_y, _), (ll_z, _) = tasks.loglikelihoods(model, enc, 4, [("zx", "y"), ("zx", "z")])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([[3, 0, 3]]))[0].float(), -1)
    assert ll_y == pytest.approx(logp[0, 2].item(), abs=1e-5) and ll_y < 0  # P("xy" | "z"), not probability 1
    assert ll_z == pytest.approx(logp[1, 3].item(), abs=1e-5)
    with pytest.raises(Exception, match="continuation"):
        tasks.encode_pair(enc, "x", "", 4)


# ---------------------------------------------------------------------------- export
def test_config_round_trips_every_feature():
    cfg = ModelConfig(vocab_size=97, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden=64,
                      max_seq_len=32, rope_theta=5e5, rope_scaling=dict(LLAMA3), norm_eps=1e-6,
                      attention_bias=True, mlp_bias=True, tie_embeddings=True)
    assert from_hf_config(to_hf_config(cfg)) == dataclasses.replace(cfg, init_std=0.02)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_export_parity_with_every_feature(tmp_path):
    from steplm.data.tokenizer import load_tokenizer
    from steplm.io.hf import export
    from steplm.model.llama import build_model
    cfg = ModelConfig(vocab_size=300, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden=64,
                      max_seq_len=64, rope_scaling=dict(LLAMA3), attention_bias=True, mlp_bias=True, init_std=0.1)
    model = build_model(cfg, seed=1).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, 0.5)
    export(model, load_tokenizer("bpe:300", iter([TEXT])), tmp_path)
    x = ids(300)
    with torch.no_grad():
        assert (model(x) - hf_logits(tmp_path, x)).abs().max().item() <= 2e-5


def test_export_bf16_sharded_with_history_round_trips(tiny_run, tmp_path, capsys):
    from steplm.io.run_dir import load_model
    out = tmp_path / "hf"
    assert main(["export", str(tiny_run), "--to", str(out), "--dtype", "bf16", "--max-shard-size", "100KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert not (out / "model.safetensors").exists()
    cfg = json.loads((out / "config.json").read_text())
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    assert cfg["steplm"]["method"] == summary["method"]
    assert cfg["steplm"]["layers_per_stage"] == summary["layers_per_stage"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert hf.model.embed_tokens.weight.dtype == torch.float32
    ours, _ = load_model(tiny_run)
    with torch.no_grad():  # the run's weights rounded to bf16 are exactly what transformers reads
        for p in ours.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        back, _ = load_model(out)
        x = ids(ours.config.vocab_size, T=32)
        theirs = hf(input_ids=x).logits
        assert (ours(x) - theirs).abs().max().item() <= 2e-5
        assert (back(x) - theirs).abs().max().item() <= 2e-5
    depths = " -> ".join(str(sum(summary["layers_per_stage"][:i + 1])) for i in range(len(summary["layers_per_stage"])))
    assert main(["info", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "kind:            Hugging Face Llama" in lines and f"stages:          {depths} layers" in lines
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steplm"]["method"] == summary["method"]
    assert main(["info", str(tiny_run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "kind:            steplm run" in lines and f"method:          {summary['method']}" in lines
    assert any(ln.startswith("special tokens:  eos '<|endoftext|>'") for ln in lines)


@pytest.mark.parametrize("args,needle", [
    (["--dtype", "fp16"], "--dtype"),
    (["--max-shard-size", "lots"], "--max-shard-size"),
    (["--max-shard-size", "0"], "--max-shard-size"),
])
def test_export_flags_refuse_bad_values(tiny_run, tmp_path, capsys, args, needle):
    assert main(["export", str(tiny_run), "--to", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
    assert not (tmp_path / "x").exists()
