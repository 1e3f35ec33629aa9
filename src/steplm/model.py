"""LLaMA decoder, architecture only.

Parameter names match Hugging Face ``LlamaForCausalLM`` one to one
(``model.layers.0.self_attn.q_proj.weight`` ...), so export is a plain copy.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


def default_ffn_hidden(d_model: int, multiple_of: int = 64) -> int:
    """LLaMA's SwiGLU width: 8/3·d rounded up to a multiple of ``multiple_of``."""
    hidden = int(8 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class ModelConfig:
    vocab_size: int = 50257
    """Vocabulary size; must cover the tokenizer's."""
    d_model: int = 256
    """Hidden size d."""
    n_layers: int = 8
    """Number of decoder blocks L (the final depth for STEP)."""
    n_heads: int = 4
    """Attention heads; d_model must be divisible by it."""
    n_kv_heads: int | None = None
    """Key/value heads for GQA; None means n_heads (plain multi-head attention)."""
    ffn_hidden: int | None = None
    """SwiGLU hidden size; None means 8/3·d rounded up to a multiple of 64."""
    max_seq_len: int = 256
    """Longest sequence the model is trained on (RoPE is computed up to it)."""
    rope_theta: float = 10000.0
    """RoPE base."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the token embedding with the LM head."""
    init_std: float = 0.02
    """Std of the normal init; output projections are further scaled by depth."""

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_hidden is None:
            self.ffn_hidden = default_ffn_hidden(self.d_model)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def problems(self) -> list[str]:
        """Every inconsistency in this config, each naming the key to change."""
        out = []
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                out.append(f"model.{name}: must be a positive integer, got {v!r}")
        if not out:
            if self.d_model % self.n_heads:
                out.append(f"model.d_model: must be divisible by model.n_heads ({self.n_heads}), got {self.d_model}")
            elif self.head_dim % 2:
                out.append(f"model.d_model: head size d_model/n_heads must be even for RoPE, got {self.head_dim}")
            if self.n_heads % self.n_kv_heads:
                out.append(f"model.n_kv_heads: must divide model.n_heads ({self.n_heads}), got {self.n_kv_heads}")
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as HF does, then scale in the input dtype.
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return y * self.weight.to(x.dtype)


def rope_cache(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (seq_len, head_dim), HF's non-interleaved layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hs)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, T, hs); cos/sin: (T, hs)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin, kv_cache=None):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        # Causal mask only when queries and keys start together (training, prefill).
        causal = k.shape[2] == T
        if not causal and T > 1:
            raise ValueError("multi-token decode against a cache is not supported")
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal and T > 1,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, d)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The part HF calls ``LlamaModel``: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)


class KVCache:
    """Per-layer key/value cache for incremental decoding."""

    def __init__(self):
        self.k = self.v = None

    def update(self, k, v):
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return self.k, self.v

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]


class LLaMA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()
        cos, sin = rope_cache(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False  # recompute block activations in backward (set by the trainer)

    def tie_weights(self):
        """Share embedding and head (again after ``to_empty``, which re-creates parameters)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def init_weights(self, generator: torch.Generator | None = None):
        """Normal(0, init_std) init; o_proj/down_proj of block ``layer_id`` get std/sqrt(2(layer_id+1))."""
        std = self.config.init_std
        nn.init.normal_(self.model.embed_tokens.weight, std=std, generator=generator)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std, generator=generator)
        nn.init.ones_(self.model.norm.weight)
        for layer_id, block in enumerate(self.model.layers):
            init_block(block, layer_id, std, generator)
        cos, sin = rope_cache(self.config.max_seq_len, self.config.head_dim, self.config.rope_theta,
                              device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, idx: torch.Tensor, kv_caches: list[KVCache] | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T); hidden states (B, T, d) if ``return_hidden``."""
        B, T = idx.shape
        start = kv_caches[0].length if kv_caches else 0
        if start + T > self.rope_cos.shape[0]:
            raise ValueError(f"sequence of {start + T} tokens exceeds model.max_seq_len ({self.rope_cos.shape[0]})")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        x = self.model.embed_tokens(idx)  # (B, T, d)
        for i, block in enumerate(self.model.layers):
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, kv_caches[i] if kv_caches else None)
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x)


def init_block(block: Block, layer_id: int, std: float, generator=None):
    """Initialise one block in place; depth-scaled std for the residual output projections."""
    out_std = std / math.sqrt(2 * (layer_id + 1))
    for name, mod in block.named_modules():
        if isinstance(mod, nn.Linear):
            s = out_std if name.endswith(("o_proj", "down_proj")) else std
            nn.init.normal_(mod.weight, std=s, generator=generator)
        elif isinstance(mod, RMSNorm):
            nn.init.ones_(mod.weight)


def build_model(cfg: ModelConfig, seed: int = 0, device: str | torch.device = "cpu") -> LLaMA:
    """Build on the meta device, materialise on ``device`` and initialise with a seeded generator."""
    with torch.device("meta"):
        model = LLaMA(cfg)
    model.to_empty(device=device)
    model.tie_weights()
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        model.init_weights(gen)
    return model


def from_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor], device="cpu") -> LLaMA:
    """A model in eval mode holding ``state`` (built on meta, so no init is wasted)."""
    with torch.device("meta"):
        model = LLaMA(cfg)
    model.to_empty(device=device)
    model.tie_weights()
    if cfg.tie_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        cos, sin = rope_cache(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta, device=device)
        model.rope_cos.copy_(cos)
        model.rope_sin.copy_(sin)
    return model.eval()


def count_params(model: nn.Module) -> dict[str, int]:
    """Parameter counts: embedding (token embedding + untied head), non-embedding, trainable, frozen, total."""
    seen, total, trainable, lora = set(), 0, 0, 0
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
        lora += p.numel() if "lora_" in name else 0
    emb = model.model.embed_tokens.weight.numel()
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        emb += model.lm_head.weight.numel()
    return {"embedding": emb, "non_embedding": total - emb, "trainable": trainable,
            "frozen": total - trainable, "lora": lora, "total": total}
