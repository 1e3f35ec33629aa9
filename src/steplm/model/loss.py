"""Next-token cross-entropy fused with the LM head, chunk by chunk: the (tokens, vocab) logits are
never materialised whole.

For each chunk of rows the head's logits are formed in the compute dtype (bf16 under autocast),
their log-sum-exp in fp32, and, because the loss is a scalar, the gradient with respect to the
logits (softmax - one-hot) right away; it is multiplied into the gradients of the hidden states
and of the head's weight and then dropped. Backward only scales those two gradients. Peak memory
is about one chunk of logits instead of tokens·vocab·(4 + 4) bytes (fp32 logits and their
gradient); the FLOPs are the same as the unfused head (2·N·d·V forward, 4·N·d·V for the two
gradients). The approach is Liger Kernel's fused linear cross-entropy (Hsu et al. 2024, arXiv
2410.10989).

Under torch.compile the softmax gradient is written as one pointwise expression (the one-hot as a
comparison with the vocabulary index), so that inductor forms it from the compute-dtype logits in
a single pass without an fp32 copy, and the log-sum-exp as max, exp and sum, so that each logit's
exponential is computed once (inductor keeps a row of them in a per-thread buffer); eager mode
uses ``logsumexp`` and subtracts the one-hot in place instead. Both give
the same values. Chunks are up to 1,024 rows (see ``chunk_rows``): fewer, taller chunks re-read
the (V, d) head weight and add a (V, d) partial of its gradient fewer times.
"""
from __future__ import annotations

import torch

from steplm.plan.memory import LOSS_CHUNK_BYTES as CHUNK_BYTES
from steplm.plan.memory import LOSS_MAX_CHUNK_ROWS as MAX_CHUNK_ROWS
from steplm.plan.memory import loss_chunk_rows as chunk_rows

IGNORE_INDEX = -100


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` (rows equal to -100 ignored)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype, chunk_bytes, max_rows):
        # hidden (N, d), weight (V, d), targets (N,) -> loss ()
        n, v = hidden.shape[0], weight.shape[0]
        w = weight.to(compute_dtype)
        h_all = hidden.to(compute_dtype)
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp(min=1).to(torch.float32)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(h_all)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight.requires_grad else None
        rows = chunk_rows(n, v, chunk_bytes, max_rows)
        compiling = torch.compiler.is_compiling()
        # the one-hot compares vocabulary indices as fp32 (exact below 2**24), which vectorises
        # at twice the width of int64
        vocab = torch.arange(v, device=hidden.device, dtype=torch.float32 if v < 2**24 else torch.int64) \
            if compiling else None
        for start in range(0, n, rows):
            h = h_all[start:start + rows]                                   # (n_c, d)
            y = targets[start:start + rows]                                 # (n_c,)
            ok = valid[start:start + rows]
            logits = (h @ w.t()).float()                                    # (n_c, V)
            safe_y = torch.where(ok, y, 0)
            target_logit = logits.gather(1, safe_y[:, None]).squeeze(1)
            # d loss / d logits = (softmax - one_hot) / count on valid rows, 0 on ignored ones
            scale = (ok.float() / count)[:, None]
            if compiling:
                # max, then exp(l - max) once: inductor keeps each row's exponentials in a per-thread
                # buffer for both the sum and the gradient (one exp per logit, not logsumexp's two)
                row_max = logits.amax(-1, keepdim=True)                     # (n_c, 1)
                e = torch.exp(logits - row_max)
                total = e.sum(-1, keepdim=True)
                lse = (total.log() + row_max).squeeze(1)
                one_hot = (vocab[None, :] == safe_y.to(vocab.dtype)[:, None]).float()
                grad = ((e / total - one_hot) * scale).to(compute_dtype)
            else:
                lse = torch.logsumexp(logits, dim=-1)                       # (n_c,)
                grad = torch.exp(logits - lse[:, None])
                grad.scatter_add_(1, safe_y[:, None], torch.full_like(lse[:, None], -1.0))
                grad = (grad * scale).to(compute_dtype)                    # (n_c, V)
            loss = loss + ((lse - target_logit) * ok).sum()
            grad_h[start:start + rows] = grad @ w                           # (n_c, d)
            if grad_w is not None:
                grad_w += (grad.t() @ h).float()                            # (V, d)
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
        ctx.hidden_dtype, ctx.has_grad_w = hidden.dtype, grad_w is not None
        return loss / count

    @staticmethod
    def backward(ctx, grad_out):
        # In place: the saved gradients are this node's own buffers, used once (no double backward),
        # so scaling them allocates no second (V, d) tensor.
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h.mul_(grad_out).to(ctx.hidden_dtype)
        dw = grad_w.mul_(grad_out) if ctx.has_grad_w else None
        return dh, dw, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         compute_dtype: torch.dtype | None = None, chunk_bytes: int = CHUNK_BYTES,
                         max_rows: int = MAX_CHUNK_ROWS) -> torch.Tensor:
    """Mean next-token loss (nats) of logits ``hidden @ weight.T``, never materialising them whole.

    hidden (..., d), weight (V, d), targets (...) of token ids (-100: ignored). ``compute_dtype`` is
    the matmul dtype (default: the autocast dtype when autocast is on, else hidden's); the softmax is
    fp32. ``chunk_bytes`` and ``max_rows`` bound one chunk (``chunk_rows``: 512 rows at V = 50257).
    """
    if compute_dtype is None:
        dev = hidden.device.type
        compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    with torch.autocast(hidden.device.type, enabled=False):
        return LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                        compute_dtype, chunk_bytes, max_rows)
