"""Causal self-attention for training on CPU: PyTorch's flash forward, a backward made of batched
matmuls.

On CPU, ``F.scaled_dot_product_attention``'s flash backward (ATen's
``_scaled_dot_product_flash_attention_for_cpu_backward``) ran 7x its forward's time at the
replication shape (batch 16, 4 heads, 256 tokens, head 64, bf16, 2 threads of an AMX Xeon) and was
a quarter of the whole train step. ``CausalAttention`` keeps the flash forward (and its per-row
log-sum-exp) and recomputes the attention probabilities in the backward from batched matmuls, which
run on the CPU's bf16 matmul units:

    S  = q·kᵀ·scale  (fp32, from an fp32 matmul)    P  = exp(S - lse), 0 above the diagonal
    dV = Pᵀ·dO                                      dP = dO·Vᵀ
    dS = P ⊙ (dP - rowsum(dO ⊙ O))·scale            dQ = dS·K,  dK = dSᵀ·Q

(Dao et al. 2022, FlashAttention, Algorithm 4, without the tiling). P, dP and dS are (B, H, T, T):
quadratic in T, so the backward works on slices of the batch whose three (T, T) fp32 buffers fit in
``slice_bytes``. S is formed in fp32 so that P is as accurate as flash's; dP, dV, dQ and dK are
bf16 matmuls with fp32 accumulation. ``benchmarks/throughput.py --attention`` times both against
each other and measures their error against an fp64 reference; ``train.attention_matmul_backward:
false`` keeps torch's SDPA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SLICE_BYTES = 64 * 2**20
BLOCK = 128


def use_matmul_backward(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether ``causal_attention`` replaces the flash backward: CPU, bf16, as many key/value heads
    as query heads, more than one token, and a backward to come."""
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape == k.shape and q.shape[-2] > 1
            and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))


class CausalAttention(torch.autograd.Function):
    """softmax(q·kᵀ·scale + causal mask)·v for q, k, v (B, H, T, hd) on CPU; returns (B, H, T, hd)."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, slice_bytes: int, block: int):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.slice_bytes, ctx.block = scale, slice_bytes, block
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        scale, (B, H, T, _), c = ctx.scale, q.shape, ctx.block
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        row = (grad_out.float() * out.float()).sum(-1, keepdim=True)                # rowsum(dO ⊙ O): (B, H, T, 1)
        step = max(1, min(B, ctx.slice_bytes // (3 * 4 * H * T * min(c, T))))
        for b in range(0, B, step):
            bs = slice(b, b + step)
            for j in range(0, T, c):  # key block j: only queries from j on see it
                ks, qs = slice(j, j + c), slice(j, T)
                qb, kb, vb, gb = q[bs, :, qs], k[bs, :, ks], v[bs, :, ks], grad_out[bs, :, qs]
                above = torch.ones(T - j, kb.shape[2], dtype=torch.bool, device=q.device).triu(1)
                s = (qb.float() @ kb.float().transpose(-1, -2)) * scale              # (b, H, T - j, c)
                p = torch.exp(s.masked_fill(above, float("-inf")) - lse[bs, :, qs].unsqueeze(-1))
                dv[bs, :, ks] = p.to(vb.dtype).transpose(-1, -2) @ gb
                dp = (gb @ vb.transpose(-1, -2)).float()
                ds = (p * (dp - row[bs, :, qs]) * scale).to(qb.dtype)
                dk[bs, :, ks] = ds.transpose(-1, -2) @ qb
                dq[bs, :, qs] += (ds @ kb).float()
        return dq.to(q.dtype), dk, dv, None, None, None
