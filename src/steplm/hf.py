"""Hugging Face Llama conversion: an explicit key map, config translation, export and import.

steplm's parameter names already are HF's, so the key map is the identity over the names a plain
(merged) model has; it is spelled out so that any future rename shows up here.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from .errors import UserError
from .model import LLaMA, ModelConfig, from_state_dict

_LAYER_KEYS = ["input_layernorm.weight", "post_attention_layernorm.weight",
               *(f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
               *(f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj"))]


def key_map(cfg: ModelConfig) -> dict[str, str]:
    """steplm parameter name -> HF LlamaForCausalLM parameter name."""
    keys = ["model.embed_tokens.weight", "model.norm.weight"]
    keys += [f"model.layers.{i}.{k}" for i in range(cfg.n_layers) for k in _LAYER_KEYS]
    if not cfg.tie_embeddings:
        keys.append("lm_head.weight")
    return {k: k for k in keys}


def to_hf_config(cfg: ModelConfig, eos_token_id: int | None = None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32", "dtype": "float32",
        "initializer_range": cfg.init_std, "bos_token_id": eos_token_id, "eos_token_id": eos_token_id,
    }


def from_hf_config(d: dict) -> ModelConfig:
    if d.get("model_type") != "llama":
        raise UserError(f"MODEL: config.json has model_type {d.get('model_type')!r}; only Llama models are supported")
    theta = d.get("rope_theta") or (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return ModelConfig(vocab_size=d["vocab_size"], d_model=d["hidden_size"], n_layers=d["num_hidden_layers"],
                       n_heads=d["num_attention_heads"], n_kv_heads=d.get("num_key_value_heads"),
                       ffn_hidden=d["intermediate_size"], max_seq_len=d.get("max_position_embeddings", 2048),
                       rope_theta=float(theta), norm_eps=d.get("rms_norm_eps", 1e-6),
                       tie_embeddings=bool(d.get("tie_word_embeddings", False)))


def save_tokenizer(tokenizer, out: Path, max_len: int):
    """tokenizer.json + tokenizer_config.json that AutoTokenizer loads offline."""
    from transformers import PreTrainedTokenizerFast

    from .data import EOS
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS,
                                   unk_token=EOS, model_max_length=max_len)
    fast.save_pretrained(str(out))


def export(model: LLaMA, tokenizer, out_dir: str | Path):
    """Write an HF Llama directory: config.json, model.safetensors, tokenizer files."""
    from .data import eos_id
    from .lora import merged_state_dict

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--to: cannot create {out} ({e.strerror})")
    state = merged_state_dict(model)
    kmap = key_map(model.config)
    if set(state) != set(kmap):
        raise RuntimeError(f"key map mismatch: {sorted(set(state) ^ set(kmap))[:5]}")
    hf_state = {kmap[k]: v for k, v in state.items()}
    save_file(hf_state, str(out / "model.safetensors"), metadata={"format": "pt"})
    eos = eos_id(tokenizer)
    (out / "config.json").write_text(json.dumps(to_hf_config(model.config, eos), indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "bos_token_id": eos}))
    save_tokenizer(tokenizer, out, model.config.max_seq_len)


def load_hf_dir(path: str | Path, device="cpu") -> tuple[LLaMA, object]:
    """A steplm model and ``tokenizers.Tokenizer`` from an HF Llama directory (no transformers needed)."""
    from tokenizers import Tokenizer

    d = Path(path)
    if not (d / "config.json").is_file():
        raise UserError(f"MODEL: {d} has no config.json (give a steplm run directory or an HF model directory)")
    cfg = from_hf_config(json.loads((d / "config.json").read_text()))
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise UserError(f"MODEL: {d} has no *.safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(str(f), device=str(device)))
    inverse = {v: k for k, v in key_map(cfg).items()}
    missing = set(inverse) - set(state)
    if missing:
        raise UserError(f"MODEL: {d} lacks Llama weights such as {sorted(missing)[0]}")
    model = from_state_dict(cfg, {inverse[k]: state[k].float() for k in inverse}, device)
    if not (d / "tokenizer.json").is_file():
        raise UserError(f"MODEL: {d} has no tokenizer.json")
    return model, Tokenizer.from_file(str(d / "tokenizer.json"))
