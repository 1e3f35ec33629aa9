"""Causal self-attention for training on CPU: PyTorch's flash forward, a backward made of batched
matmuls.

On CPU, ``F.scaled_dot_product_attention``'s flash backward (ATen's
``_scaled_dot_product_flash_attention_for_cpu_backward``) took 4.5x its forward's time and a
quarter of the whole train step in the profile of the replication shape (batch 16, 4 heads, 256
tokens, head 64, bf16, 2 threads of an AMX Xeon). ``CausalAttention`` keeps the flash forward (and its per-row
log-sum-exp) and recomputes the attention probabilities in the backward from batched matmuls, which
run on the CPU's bf16 matmul units:

    S  = q·kᵀ·scale  (fp32, from an fp32 matmul)    P  = exp(S - lse), 0 above the diagonal
    dV = Pᵀ·dO                                      dP = dO·Vᵀ
    dS = P ⊙ (dP - rowsum(dO ⊙ O))·scale            dQ = dS·K,  dK = dSᵀ·Q

(Dao et al. 2022, FlashAttention, Algorithm 4, with the query-row tiling left out). The keys go in
blocks of ``block`` (128): block j meets only the queries from j on, so most of the causal half
above the diagonal is never computed. P and dS are quadratic in T, so the backward also walks
slices of the batch, sized so that three (b, H, T, block) fp32 buffers fit in ``slice_bytes``
(it holds two fp32 ones and their bf16 copies). S is an fp32 matmul so that P is as accurate as
flash's; dP, dV, dQ and dK are bf16 matmuls (fp32 accumulation inside each; dQ's per-block
products are rounded to bf16 and summed in fp32). ``benchmarks/throughput.py --attention`` times both against
each other and measures their error against an fp64 reference; ``train.attention_matmul_backward:
false`` keeps torch's SDPA.
"""
from __future__ import annotations

import torch

SLICE_BYTES = 64 * 2**20
BLOCK = 128
NATIVE_BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()  # AVX-512 bf16 or AMX; read once, not per call


def use_matmul_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the model uses ``CausalAttention`` instead of SDPA: on a CPU with native bf16 matmuls
    (AVX-512 bf16 or AMX; elsewhere bf16 matmuls are emulated and slower than flash's fp32 inner
    loop), for bf16 q, k, v of one shape (as many key/value heads as query heads), more than one
    token, and a backward to come."""
    return (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.bfloat16
            and q.shape == k.shape == v.shape and q.shape[-2] > 1 and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad)
            and NATIVE_BF16)


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
        with torch.autocast(q.device.type, enabled=False):  # S must stay an fp32 matmul
            for b in range(0, B, step):
                bs = slice(b, b + step)
                for j in range(0, T, c):  # key block j: only queries from j on see it
                    ks, qs = slice(j, j + c), slice(j, T)
                    qb, kb, vb, gb = q[bs, :, qs], k[bs, :, ks], v[bs, :, ks], grad_out[bs, :, qs]
                    above = torch.ones(T - j, kb.shape[2], dtype=torch.bool, device=q.device).triu(1)
                    # in place: two (b, H, T - j, c) fp32 buffers at a time (p, then dp -> dS), plus bf16 copies
                    p = (qb.float() @ kb.float().transpose(-1, -2)).mul_(scale)
                    p = p.masked_fill_(above, float("-inf")).sub_(lse[bs, :, qs].unsqueeze(-1)).exp_()
                    dv[bs, :, ks] = p.to(vb.dtype).transpose(-1, -2) @ gb
                    ds = (gb @ vb.transpose(-1, -2)).float().sub_(row[bs, :, qs]).mul_(p).mul_(scale).to(qb.dtype)
                    dk[bs, :, ks] = ds.transpose(-1, -2) @ qb
                    dq[bs, :, qs] += (ds @ kb).float()
        return dq.to(q.dtype), dk, dv, None, None, None
