"""LLaMA decoder, architecture only.

Parameter names match Hugging Face ``LlamaForCausalLM`` one to one
(``model.layers.0.self_attn.q_proj.weight`` ...), so export is a plain copy.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from steplm.config.schema import ROPE_SCALING_KEYS, ModelConfig, default_ffn_hidden  # noqa: F401
from steplm.model.attention import BLOCK, SLICE_BYTES, CausalAttention, use_matmul_backward
from steplm.model.loss import linear_cross_entropy




class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as HF does, then scale in the input dtype.
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return y * self.weight.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies (head_dim/2,) in rad/token, and the factor on cos/sin (1 unless yarn).

    Plain RoPE is computed here; scaled types (``cfg.rope_scaling``) by transformers' own
    ``ROPE_INIT_FUNCTIONS``, so they match ``LlamaForCausalLM`` exactly."""
    hs = cfg.head_dim
    if cfg.rope_scaling is None:
        return 1.0 / (cfg.rope_theta ** (torch.arange(0, hs, 2, device=device, dtype=torch.int64).float() / hs)), 1.0
    try:
        from transformers import LlamaConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    except ImportError as e:
        raise ImportError("model.rope_scaling needs transformers (pip install 'steplm[hf]')") from e
    hf = LlamaConfig(hidden_size=cfg.n_heads * hs, num_attention_heads=cfg.n_heads, head_dim=hs,
                     max_position_embeddings=cfg.max_seq_len,
                     rope_parameters={**cfg.rope_scaling, "rope_theta": cfg.rope_theta})
    inv_freq, scale = ROPE_INIT_FUNCTIONS[cfg.rope_scaling["rope_type"]](hf, device)
    return inv_freq.float(), float(scale)


def rope_cache(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_seq_len, head_dim), HF's non-interleaved layout."""
    inv_freq, scale = rope_inv_freq(cfg, device)
    t = torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq.to(device))  # (T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hs)
    return emb.cos() * scale, emb.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, T, hs); cos/sin: (T, hs), or (B, 1, T, hs) with per-row positions
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    matmul_backward = True  # causal training on CPU in bf16: attention.CausalAttention (the trainer sets it)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        d, q, kv, bias = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.attention_bias
        self.q_proj = nn.Linear(d, q, bias=bias)
        self.k_proj = nn.Linear(d, kv, bias=bias)
        self.v_proj = nn.Linear(d, kv, bias=bias)
        self.o_proj = nn.Linear(q, d, bias=bias)

    def forward(self, x, cos, sin, kv_cache=None, attn_mask=None):
        # attn_mask: None (causal), or (B, 1, T, S) bool, True where a query may attend a key
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        if attn_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=self.n_kv_heads != self.n_heads)
        else:
            # Causal mask only when queries and keys start together (training, prefill).
            causal = k.shape[2] == T
            if not causal and T > 1:
                raise ValueError("multi-token decode against a cache is not supported without an attention mask")
            if causal and self.matmul_backward and use_matmul_backward(q, k, v):
                y = CausalAttention.apply(q, k, v, self.head_dim ** -0.5, SLICE_BYTES, BLOCK)
            else:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=causal and T > 1,
                                                   enable_gqa=self.n_kv_heads != self.n_heads)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, nh·hs)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv_cache=None, attn_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The part HF calls ``LlamaModel``: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # No default init: LLaMA.init_weights (or a state dict) fills it, and Embedding's own normal_
        # on the meta device goes through torch._refs, which imports torch._dynamo (~1.5 s per process).
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model, _weight=torch.empty(cfg.vocab_size, cfg.d_model))
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
        # RoPE tables (max_seq_len, head_dim). On the meta device (build_model, from_state_dict) they are
        # filled after to_empty: meta ops run through torch._refs, which imports torch._dynamo (~1.5 s).
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
        if self.rope_cos.device.type != "meta":
            self.reset_rope()
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
        self.reset_rope()

    @torch.no_grad()
    def reset_rope(self):
        """Fill the RoPE cos/sin buffers from the config, on their device."""
        cos, sin = rope_cache(self.config, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, idx: torch.Tensor, kv_caches: list[KVCache] | None = None,
                return_hidden: bool = False, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T); hidden states (B, T, d) if ``return_hidden``;
        with ``targets`` (B, T) the mean cross-entropy (nats), the head fused with the loss so that
        the logits are never materialised whole (``loss.linear_cross_entropy``).

        For left-padded batches give ``attention_mask`` (B, S) bool, True at real tokens of the cache plus
        ``idx`` (S = cached + T), and ``position_ids`` (B, T), each row's RoPE positions (HF's meaning)."""
        B, T = idx.shape
        start = kv_caches[0].length if kv_caches else 0
        if position_ids is None:
            if start + T > self.rope_cos.shape[0]:
                raise ValueError(f"sequence of {start + T} tokens exceeds model.max_seq_len ({self.rope_cos.shape[0]})")
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]  # (T, hs)
        else:
            cos, sin = self.rope_cos[position_ids][:, None], self.rope_sin[position_ids][:, None]  # (B, 1, T, hs)
        mask = None
        if attention_mask is not None:
            q_pos = torch.arange(start, start + T, device=idx.device)[:, None]  # (T, 1) index among the keys
            k_pos = torch.arange(start + T, device=idx.device)[None, :]  # (1, S)
            # causal and not padding; a query always sees itself, so a padding query's row is never empty
            mask = ((k_pos <= q_pos) & attention_mask[:, None, None, :]) | (k_pos == q_pos)  # (B, 1, T, S)
        x = self.model.embed_tokens(idx)  # (B, T, d)
        for i, block in enumerate(self.model.layers):
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, None, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, kv_caches[i] if kv_caches else None, mask)
        x = self.model.norm(x)
        if targets is not None:
            return linear_cross_entropy(x, self.lm_head.weight, targets)
        return x if return_hidden else self.lm_head(x)


def init_block(block: Block, layer_id: int, std: float, generator=None):
    """Initialise one block in place; depth-scaled std for the residual output projections."""
    out_std = std / math.sqrt(2 * (layer_id + 1))
    for name, mod in block.named_modules():
        if isinstance(mod, nn.Linear):
            s = out_std if name.endswith(("o_proj", "down_proj")) else std
            nn.init.normal_(mod.weight, std=s, generator=generator)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
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
    model.reset_rope()
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
