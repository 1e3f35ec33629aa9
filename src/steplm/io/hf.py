"""Hugging Face Llama conversion: an explicit key map, config translation, export and import.

steplm's parameter names already are HF's, so the key map is the identity over the names a plain
(merged) model has; it is spelled out so that any future rename shows up here.

Import is exact or refuses: every ``LlamaConfig`` field that changes the computation is either
implemented (``IMPLEMENTED``) or checked and refused with one line naming it (``CHECKED``);
``NO_EFFECT`` lists the fields that cannot change the logits. ``tests/test_hf.py`` checks that
these three sets cover transformers' own ``LlamaConfig``.
"""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import torch

from steplm.errors import UserError
from steplm.io.files import read_json, read_safetensors
from steplm.config.schema import ROPE_SCALING_KEYS, ModelConfig
from steplm.model.llama import LLaMA
from steplm.io.special_tokens import SpecialTokens, gpt2_special_tokens, write_special_tokens

# LlamaConfig fields, by what import does with them.
IMPLEMENTED = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
               "tie_word_embeddings", "attention_bias", "mlp_bias"}
CHECKED = {"hidden_act", "attention_dropout"}  # refused unless silu/swish, 0
# pretraining_tp > 1 only split the matmuls into slices in transformers 4 (the same sums) and is not
# read by transformers 5's LlamaForCausalLM.
NO_EFFECT = {"initializer_range", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "pretraining_tp"}
# Keys outside LlamaConfig that would change the computation if honoured: refused when set.
REFUSED_EXTRA = {"quantization_config": "steplm loads only unquantized weights"}
# Keys outside LlamaConfig that LlamaForCausalLM does not read: loaded as transformers loads them, with a warning.
IGNORED_EXTRA = {"sliding_window": "LlamaForCausalLM attends over the whole context, and so does steplm"}
ACTIVATIONS = ("silu", "swish")
# steplm ModelConfig key -> config.json key, to name the right field in errors.
HF_NAMES = {"vocab_size": "vocab_size", "d_model": "hidden_size", "n_layers": "num_hidden_layers",
            "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
            "ffn_hidden": "intermediate_size", "max_seq_len": "max_position_embeddings",
            "rope_scaling": "rope_parameters", "attention_bias": "attention_bias", "mlp_bias": "mlp_bias",
            "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps", "tie_embeddings": "tie_word_embeddings"}
_IGNORED_TENSOR = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # old checkpoints' RoPE buffer

_LINEARS = [*(f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
            *(f"mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj"))]


def key_map(cfg: ModelConfig) -> dict[str, str]:
    """steplm parameter name -> HF LlamaForCausalLM parameter name."""
    layer = ["input_layernorm.weight", "post_attention_layernorm.weight", *(f"{n}.weight" for n in _LINEARS)]
    layer += [f"{n}.bias" for n in _LINEARS if cfg.attention_bias and n.startswith("self_attn")]
    layer += [f"{n}.bias" for n in _LINEARS if cfg.mlp_bias and n.startswith("mlp")]
    keys = ["model.embed_tokens.weight", "model.norm.weight"]
    keys += [f"model.layers.{i}.{k}" for i in range(cfg.n_layers) for k in layer]
    if not cfg.tie_embeddings:
        keys.append("lm_head.weight")
    return {k: k for k in keys}


# ---------------------------------------------------------------------------- config
def to_hf_config(cfg: ModelConfig, special: SpecialTokens | None = None, dtype: str = "float32",
                 history: dict | None = None) -> dict:
    """config.json for ``cfg``; ``history`` (steplm's stage record) goes under the key "steplm"."""
    rope = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    out = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": rope,
        "hidden_act": "silu", "attention_bias": cfg.attention_bias, "mlp_bias": cfg.mlp_bias,
        "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": dtype, "dtype": dtype,
        "initializer_range": cfg.init_std,
    }
    if special is not None:
        out["bos_token_id"] = special.bos_id
        out["eos_token_id"] = special.stop_ids[0] if len(special.stop_ids) == 1 else list(special.stop_ids)
    if history:
        out["steplm"] = history
    return out


def _refuse(field: str, problem: str):
    raise UserError(key="MODEL", message=f"config.json {field} {problem}")


def _rope(d: dict) -> tuple[float, dict | None]:
    """(rope_theta, ModelConfig.rope_scaling) with transformers' precedence: legacy rope_scaling over
    rope_parameters, a theta inside the dict over the top-level rope_theta."""
    field = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    rope = d.get(field) or {}
    if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
        _refuse(field, "must be one mapping (per-layer RoPE is not supported)")
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not 0 < theta < float("inf"):
        _refuse("rope_theta", f"must be a finite positive number, got {theta!r}")  # JSON's NaN fails 0 < theta
    for where, v in ((field, rope.get("partial_rotary_factor")), ("", d.get("partial_rotary_factor"))):
        if v not in (None, 1, 1.0):
            _refuse(f"{where} partial_rotary_factor".strip(), f"{v!r} is not supported (RoPE on the whole head only)")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind not in ROPE_SCALING_KEYS:
        _refuse(f"{field} rope_type", f"{kind!r} is not supported (steplm implements default, "
                                      f"{', '.join(ROPE_SCALING_KEYS)})")
    if importlib.util.find_spec("transformers") is None:
        _refuse(f"{field} rope_type", f"{kind!r} needs transformers installed (pip install 'steplm[hf]')")
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "type", "partial_rotary_factor")}
    scaling["rope_type"] = kind
    if kind in ("llama3", "yarn"):  # transformers: a top-level original_max_position_embeddings wins
        if "original_max_position_embeddings" in d:
            scaling["original_max_position_embeddings"] = d["original_max_position_embeddings"]
        scaling.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 2048))
    return float(theta), scaling


def from_hf_config(d: dict) -> ModelConfig:
    """The ModelConfig of an HF Llama config.json, or a one-line UserError naming the field steplm cannot honour."""
    if d.get("model_type") != "llama":
        raise UserError(key="MODEL", message=f"config.json has model_type {d.get('model_type')!r}; only Llama models are supported")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in d]
    if missing:
        raise UserError(key="MODEL", message=f"config.json lacks {missing[0]}")
    act = d.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        _refuse("hidden_act", f"{act!r} is not supported (steplm's MLP is SwiGLU: {' or '.join(ACTIVATIONS)})")
    pretraining_tp = d.get("pretraining_tp", 1)
    if pretraining_tp is not None and not (isinstance(pretraining_tp, int) and not isinstance(pretraining_tp, bool)
                                           and pretraining_tp >= 1):
        _refuse("pretraining_tp", f"must be a positive integer, got {pretraining_tp!r}")
    if d.get("attention_dropout") not in (None, 0, 0.0):
        _refuse("attention_dropout", f"{d['attention_dropout']!r} is not supported (only 0)")
    for key, what in REFUSED_EXTRA.items():
        if d.get(key) is not None:
            _refuse(key, f"is set, but {what}")
    for key, what in IGNORED_EXTRA.items():
        if d.get(key) is not None:
            print(f"steplm: warning: config.json sets {key} ({d[key]!r}), which model_type llama does not use: "
                  f"{what}", file=sys.stderr)
    for key in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        if not isinstance(d.get(key, False), bool):
            _refuse(key, f"must be true or false, got {d[key]!r}")
    theta, scaling = _rope(d)
    eps = d.get("rms_norm_eps", 1e-6)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
        _refuse("rms_norm_eps", f"must be a positive number, got {eps!r}")
    cfg = ModelConfig(vocab_size=d["vocab_size"], d_model=d["hidden_size"], n_layers=d["num_hidden_layers"],
                      n_heads=d["num_attention_heads"], n_kv_heads=d.get("num_key_value_heads"),
                      head_dim=d.get("head_dim"), ffn_hidden=d["intermediate_size"],
                      max_seq_len=d.get("max_position_embeddings", 2048), rope_theta=theta, rope_scaling=scaling,
                      norm_eps=float(eps), tie_embeddings=d.get("tie_word_embeddings", False),
                      attention_bias=d.get("attention_bias", False), mlp_bias=d.get("mlp_bias", False))
    problems = cfg.problems()
    if problems:
        names = {**HF_NAMES, "rope_scaling": "rope_scaling" if d.get("rope_scaling") else "rope_parameters"}
        msg = re.sub(r"model\.(\w+)", lambda m: names.get(m.group(1), m.group(1)), problems[0])
        raise UserError(key="MODEL", message=f"config.json {msg}")
    return cfg


# ---------------------------------------------------------------------------- weights
def _load_safetensors(path: Path, device) -> dict[str, torch.Tensor]:
    return read_safetensors(path, "MODEL", device)


def check_finite(state: dict[str, torch.Tensor], where, key: str = "MODEL") -> None:
    """UserError naming the first tensor of ``state`` that holds NaN or inf (a model that would
    evaluate to loss nan, or export one)."""
    for name, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(key=key, message=f"{where} holds non-finite weights (NaN or inf) in {name}; give a model "
                                            f"with finite weights")


def _load_bin(path: Path, device) -> dict[str, torch.Tensor]:
    """A pytorch_model.bin, unpickled with weights_only=True (tensors only, no code)."""
    import pickle
    import warnings
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing
            state = torch.load(str(path), map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError):
        raise UserError(key="MODEL", message=f"{path} holds more than tensors, so it cannot be loaded safely "
                        "(torch.load weights_only=True); convert it to safetensors")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(key="MODEL", message=f"{path} is not a state dict of tensors")
    return state


# The weight files read_weights reads, in the order it looks for them.
WEIGHT_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json", "model.safetensors", "pytorch_model.bin")


def read_weights(model_dir: str | Path, device="cpu") -> dict[str, torch.Tensor]:
    """Every tensor of an HF model directory: sharded safetensors (with model.safetensors.index.json),
    model.safetensors, or pytorch_model.bin (sharded or not), in its stored dtype."""
    d = Path(model_dir)
    for index_name, load in (("model.safetensors.index.json", _load_safetensors),
                             ("pytorch_model.bin.index.json", _load_bin)):
        index = d / index_name
        if not index.is_file():
            continue
        weight_map = read_json(index, "MODEL").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(key="MODEL", message=f"{index} has no weight_map")
        bad = [v for v in weight_map.values() if not isinstance(v, str) or Path(v).name != v]
        if bad:
            raise UserError(key="MODEL", message=f"{index} names {bad[0]!r} as a shard; shards are file names in {d}")
        state: dict[str, torch.Tensor] = {}
        for name in sorted(set(weight_map.values())):
            if not (d / name).is_file():
                raise UserError(key="MODEL", message=f"{index_name} lists {name}, which is not in {d}")
            state.update(load(d / name, device))
        absent = sorted(set(weight_map) - set(state))
        if absent:
            raise UserError(key="MODEL", message=f"{index_name} maps {absent[0]} to {weight_map[absent[0]]}, which lacks it")
        return state
    if (d / "model.safetensors").is_file():
        return _load_safetensors(d / "model.safetensors", device)
    if (d / "pytorch_model.bin").is_file():
        return _load_bin(d / "pytorch_model.bin", device)
    raise UserError(key="MODEL", message=f"{d} has no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)")


def _check_weights(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> ModelConfig:
    """Validate ``state`` against ``cfg`` (names, shapes, float dtypes) and resolve tying as transformers does:
    a stored lm_head.weight that differs from the embedding wins, with a warning. Returns the config to build."""
    for k in [k for k in state if _IGNORED_TENSOR.fullmatch(k)]:
        del state[k]
    if cfg.tie_embeddings and "lm_head.weight" in state:
        head, emb = state["lm_head.weight"], state.get("model.embed_tokens.weight")
        if emb is not None and head.shape == emb.shape and torch.equal(head, emb):
            del state["lm_head.weight"]
        else:
            print("steplm: warning: config.json tie_word_embeddings is true but the weights hold their own "
                  "lm_head.weight, which differs from the embedding; using lm_head.weight, as transformers does",
                  file=sys.stderr)
            cfg = replace(cfg, tie_embeddings=False)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LLaMA(_plain_rope(cfg)).state_dict().items()
                    if k in key_map(cfg)}
    absent = [k for k in expected if k not in state]
    if absent:
        raise UserError(key="MODEL", message=f"the weights lack {absent[0]}, which config.json implies")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise UserError(key="MODEL", message=f"the weights hold {extra[0]}, which config.json does not describe "
                        "(a bias with attention_bias/mlp_bias false, or a layer steplm does not implement)")
    for k, shape in expected.items():
        t = state[k]
        if tuple(t.shape) != shape:
            raise UserError(key="MODEL", message=f"{k} has shape {tuple(t.shape)} but config.json implies {shape}")
        if not t.is_floating_point() or t.element_size() < 2:
            raise UserError(key="MODEL", message=f"{k} is stored as {str(t.dtype).replace('torch.', '')}; "
                            "only fp32, fp16 and bf16 weights are supported")
    return cfg


def _plain_rope(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` without RoPE scaling: same parameter shapes, no transformers call (for shape checks)."""
    return replace(cfg, rope_scaling=None)


# ---------------------------------------------------------------------------- export
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def save_tokenizer(tokenizer, out: Path, max_len: int, special: SpecialTokens | None = None):
    """tokenizer.json + tokenizer_config.json that AutoTokenizer loads offline, naming the model's EOS/BOS."""
    from transformers import PreTrainedTokenizerFast

    special = special or gpt2_special_tokens(tokenizer)
    eos = tokenizer.id_to_token(special.eos_id)
    bos = None if special.bos_id is None else tokenizer.id_to_token(special.bos_id)
    unk = eos if eos == "<|endoftext|>" else None  # GPT-2's convention; other tokenizers keep their own
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, bos_token=bos, unk_token=unk,
                                   model_max_length=max_len)
    fast.save_pretrained(str(out))


def export(model: LLaMA, tokenizer, out_dir: str | Path, special: SpecialTokens | None = None,
           dtype: str = "fp32", max_shard_size: int | str = "5GB", history: dict | None = None):
    """Write an HF Llama directory: config.json, model.safetensors (or shards of at most ``max_shard_size``
    bytes plus model.safetensors.index.json) in ``dtype``, generation_config.json and tokenizer files."""
    from huggingface_hub import save_torch_state_dict

    from steplm.passes.lora import merged_state_dict

    if dtype not in DTYPES:
        raise UserError(f"--dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--to: cannot create {out} ({e.strerror})")
    special = special or gpt2_special_tokens(tokenizer)
    state = merged_state_dict(model)
    kmap = key_map(model.config)
    if set(state) != set(kmap):
        raise RuntimeError(f"key map mismatch: {sorted(set(state) ^ set(kmap))[:5]}")
    hf_state = {kmap[k]: v.to(DTYPES[dtype]).contiguous() for k, v in state.items()}
    save_torch_state_dict(hf_state, out, max_shard_size=max_shard_size)
    torch_name = str(DTYPES[dtype]).replace("torch.", "")
    cfg = to_hf_config(model.config, special, torch_name, history)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    save_tokenizer(tokenizer, out, model.config.max_seq_len, special)
    write_special_tokens(out, tokenizer, special)
