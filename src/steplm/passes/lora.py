"""LoRA / ReLoRA on frozen linears, applied as a pass over a model.

``LoRALinear`` replaces an ``nn.Linear`` in place and keeps the base weight under the same name
(``...q_proj.weight``), frozen and stored in bf16 (2 B per parameter, as the planner assumes).
Adapters are fp32 ``lora_A`` (r, in) and ``lora_B`` (out, r): A Kaiming-uniform, B zero, update
B·A·alpha/r. Selecting adapters is a name test on ``lora_``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FROZEN_DTYPE = torch.bfloat16


class _LoRALinearFunction(torch.autograd.Function):
    """y = x·W_effᵀ + b with W_eff = (W + s·B·A) rounded to ``dtype``, for x (..., in), W (out, in),
    A (r, in), B (out, r): the matmul in ``dtype``, with a hand-written backward giving autograd's
    gradients of that expression: dx = g·W_eff, dA = s·(g·B)ᵀ·x, dB = s·gᵀ·(x·Aᵀ).

    The merge W + s·B·A (an out·in·r-FLOP product, small next to the N·out·in GEMM) is rounded to
    ``dtype`` only for the matmul, as autocast rounds an fp32 master weight for vanilla's matmuls
    (``_merged``: in ``dtype`` itself when W is stored in it): the adapter's update lives in fp32 A
    and B and is never rounded into the stored bf16 W (``merge`` does that, at ReLoRA restarts only).

    Why not three F.linear calls: at small ranks the (N, out)-sized passes that add the adapter's
    term to the base output and to the input gradient are memory-bound and, on CPU, ate most of what
    freezing saves (profiled in README, Throughput). Here the adapter's term is inside W_eff, so each
    direction has one big GEMM (x·W_effᵀ, g·W_eff) and the rank-r products are four in all: x·Aᵀ in
    the forward; g·B and the two adapter gradients in the backward, in the orientation oneDNN runs
    fast ((x·Aᵀ)ᵀ·g rather than gᵀ·(x·Aᵀ), 5-7x apart in fp32). They are separate calls: stacked
    into the big GEMMs (x·[W_eff; A]ᵀ) they gave them out + r columns, a width the profiler timed up
    to 1.5x slower on AMX, and the whole step with the separate form is 0.97-0.98x the stacked one at
    ranks 8 and 16 (benchmarks/lora_stacking_ab.py). W_eff is formed again in the backward rather
    than saved, so the step holds one transient (out, in) copy at a time. ``x`` should arrive in ``dtype`` (LoRALinear casts it before the call, so that a compiled
    graph casts an input shared by q, k and v, or by gate and up, once). Saves x and x·Aᵀ (N, r)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dtype: torch.dtype):
        ctx.x_shape, ctx.x_dtype, ctx.scaling, ctx.dtype = x.shape, x.dtype, scaling, dtype
        out = weight.shape[0]
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        y = x2 @ _merged(weight, lora_A, lora_B, scaling, dtype).t()
        xa = x2 @ lora_A.to(dtype).t()  # (N, r)
        if bias is not None:
            y = y + bias.to(dtype)
        ctx.save_for_backward(x2, xa, weight, lora_A, lora_B)
        return y.reshape(*x.shape[:-1], out)

    @staticmethod
    def backward(ctx, grad_y):
        x2, xa, weight, lora_A, lora_B = ctx.saved_tensors
        s, dtype = ctx.scaling, ctx.dtype
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
        need = ctx.needs_input_grad
        grad_x = None
        if need[0]:
            grad_x = (g @ _merged(weight, lora_A, lora_B, s, dtype)).reshape(ctx.x_shape).to(ctx.x_dtype)
        grad_w = (x2.t() @ g).t() if need[1] else None  # the base is frozen; kept for completeness
        grad_bias = g.sum(0) if need[2] else None
        grad_A = ((g @ lora_B.to(dtype)).t() @ x2).mul_(s) if need[3] else None
        grad_B = (xa.t() @ g).mul_(s).t() if need[4] else None
        return grad_x, grad_w, grad_bias, grad_A, grad_B, None, None


def _merged(weight, lora_A, lora_B, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """W + s·B·A as an (out, in) matrix in ``dtype``, for W (out, in), A (r, in), B (out, r).

    When W is stored in ``dtype`` (frozen bf16 W, bf16 compute), one addmm in that dtype: A and B are
    rounded to it first, as autocast rounds them for x·Aᵀ, and the product and the sum accumulate in
    fp32 (oneDNN on CPU, cuBLAS on GPU) before the one rounding of the result. Otherwise the sum is
    formed in fp32 and rounded once. The 16-bit form skips two (out, in) fp32 copies per call (W up,
    the sum down) and runs the product on the bf16 units (torch.profiler of a STEP step at the 368M
    width showed those copies among its largest excesses over vanilla's). Against W + s·B·A in
    float64, its mean error is within 5 % of the fp32 form's up to rms(s·B·A) / rms(W) = 0.1
    (``tests/test_lora.py``)."""
    if weight.dtype == dtype and dtype != torch.float32:
        return torch.addmm(weight, lora_B.to(dtype), lora_A.to(dtype), alpha=scaling)
    return torch.addmm(weight.float(), lora_B.float(), lora_A.float(), alpha=scaling).to(dtype)


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """An adapter's update B·A·scaling as an fp32 (out, in) matrix, for A (r, in) and B (out, r): what
    merging adds to the base weight (``LoRALinear.delta``, and a checkpoint's weights read as a model)."""
    return (lora_B.float() @ lora_A.float()) * scaling


class LoRALinear(nn.Module):
    """A frozen linear plus a low-rank trainable update; rank 0 means frozen with no adapter."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, frozen_dtype=FROZEN_DTYPE, generator=None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank if rank else 0.0
        self.weight = nn.Parameter(base.weight.detach().to(frozen_dtype), requires_grad=False)
        bias = None if base.bias is None else nn.Parameter(base.bias.detach().to(frozen_dtype), requires_grad=False)
        self.register_parameter("bias", bias)  # only models whose config asks for biases have one
        if rank:
            dev = base.weight.device
            self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev))
            self.reset_adapter(generator)

    @torch.no_grad()
    def reset_adapter(self, generator=None):
        """A ~ Kaiming-uniform (as nn.Linear), B = 0, so the update starts at zero."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        self.lora_B.zero_()

    def delta(self) -> torch.Tensor:
        """The adapter's update B·A·scaling as an fp32 (out, in) matrix."""
        return lora_delta(self.lora_A, self.lora_B, self.scaling)

    @torch.no_grad()
    def merge(self, rounding: str = "nearest", generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Add the update into the frozen base weight, rounded to its storage dtype (see ``round_to``).
        Returns fp32 [<applied, update>, ||update||², ||W||²] on the weight's device (None at rank 0),
        where applied is what the stored weight actually moved: the kept share is the first over the second."""
        if not self.rank:
            return None
        w, update = self.weight.float(), self.delta()
        merged = round_to(w + update, self.weight.dtype, rounding, generator)
        applied = merged.float() - w
        self.weight.copy_(merged)
        return torch.stack([(applied * update).sum(), update.square().sum(), w.square().sum()])

    def merged_weight(self) -> torch.Tensor:
        """The effective weight in fp32, without changing the module."""
        w = self.weight.detach().float()
        return w + self.delta().detach() if self.rank else w

    @staticmethod
    def compute_dtype(x: torch.Tensor) -> torch.dtype:
        """The matmuls' dtype: autocast's where it is on, the input's otherwise."""
        dev = x.device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype(x)
        b = None if self.bias is None else self.bias.to(dtype)
        if not self.rank:
            return F.linear(x.to(dtype), self.weight.to(dtype), b)
        if torch.is_grad_enabled():
            return _LoRALinearFunction.apply(x.to(dtype), self.weight, self.bias, self.lora_A, self.lora_B,
                                             self.scaling, dtype)
        # inference (evaluation, decoding): no merged copy of the weight per call
        x = x.to(dtype)
        return F.linear(x, self.weight.to(dtype), b) + F.linear(F.linear(x, self.lora_A.to(dtype)),
                                                                self.lora_B.to(dtype)) * self.scaling

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


@torch.no_grad()
def round_to(x: torch.Tensor, dtype: torch.dtype, rounding: str = "nearest",
             generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 ``x`` in ``dtype``. 'nearest' is round-to-nearest-even. 'stochastic' (bf16 only; other
    dtypes round to nearest) rounds each element's magnitude up with probability equal to its distance
    from the bf16 value below, so E[result] = x: it adds uniform noise to the 16 fp32 mantissa bits
    that bf16 drops, then truncates them. The noise comes from a generator on x's device seeded from
    ``generator``, so a run's merges are reproducible from its checkpointed generator state."""
    if rounding == "nearest" or dtype != torch.bfloat16:
        return x.to(dtype)
    if rounding != "stochastic":
        raise ValueError(f"rounding must be nearest or stochastic, got {rounding!r}")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    noise_gen = torch.Generator(device=x.device).manual_seed(seed)
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, generator=noise_gen, device=x.device, dtype=torch.int32)
    return ((bits + noise) & -65536).view(torch.float32).to(dtype)  # -65536 == 0xFFFF0000: exact in bf16


def apply_lora(block: nn.Module, rank: int, alpha: float, generator=None,
               frozen_dtype=FROZEN_DTYPE, freeze_norms: bool = True) -> int:
    """Freeze a block in place: swap its seven linears for LoRALinear and (unless ``freeze_norms`` is
    False, as ReLoRA does) store its norms frozen in ``frozen_dtype``. Returns the adapter parameter count."""
    added = 0
    for parent_name, parent in list(block.named_modules()):
        for name, child in list(parent.named_children()):
            if name in TARGETS and isinstance(child, nn.Linear):
                wrapped = LoRALinear(child, rank, alpha, frozen_dtype, generator)
                setattr(parent, name, wrapped)
                added += rank * (child.in_features + child.out_features)
    for p_name, p in block.named_parameters():
        if freeze_norms and "lora_" not in p_name and p.requires_grad:  # norms
            p.data = p.data.to(frozen_dtype)
            p.requires_grad_(False)
    return added


def lora_modules(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, LoRALinear) and m.rank]


def is_frozen_block(block: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in block.modules())


@torch.no_grad()
def merge_and_reinit(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, generator=None,
                     prune_ratio: float | None = None, rounding: str = "nearest", stats: dict | None = None) -> int:
    """ReLoRA restart: merge every adapter into its base, re-initialise A and B, and zero their Adam
    moments (or, with ``prune_ratio``, zero both moments at the prune_ratio of positions whose first
    moment is smallest in magnitude: one mask, so no kept first moment sits over a zeroed second one,
    whose update m/(√v + eps) would be huge).
    Returns the number of adapters reset. A ``stats`` dict receives, over all adapters, the share of
    the update that the rounding into the bases kept (``kept_share`` = <applied, update> / ||update||²,
    None without an update) and ``update_rms_ratio`` = rms(update) / rms(W) (one host sync)."""
    mods = lora_modules(model)
    sums = None
    for m in mods:
        s = m.merge(rounding, generator)
        sums = s if sums is None else sums + s
        m.reset_adapter(generator)
        if optimizer is None:
            continue
        for p in (m.lora_A, m.lora_B):
            state = optimizer.state.get(p)
            moments = [state[key] for key in ("exp_avg", "exp_avg_sq") if state and state.get(key) is not None]
            if not moments:
                continue
            if prune_ratio is None:
                for t in moments:
                    t.zero_()
                continue
            k = int(moments[0].numel() * prune_ratio)
            if k:
                size = moments[0].abs()
                pruned = size <= size.flatten().kthvalue(k).values
                for t in moments:
                    t.masked_fill_(pruned, 0.0)
    if stats is not None and sums is not None:
        sums = sums.full_tensor() if hasattr(sums, "full_tensor") else sums
        dot, update_sq, weight_sq = sums.tolist()
        stats.update(kept_share=dot / update_sq if update_sq > 0 else None,
                     update_rms_ratio=math.sqrt(update_sq / weight_sq) if weight_sq > 0 else None)
    return len(mods)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain fp32 state dict with adapters merged in and ``lora_*`` keys dropped (export format)."""
    out = {}
    lora_names = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    for name, t in model.state_dict().items():
        if "lora_" in name:
            continue
        mod, leaf = name.rsplit(".", 1)
        if mod in lora_names and leaf == "weight":
            t = model.get_submodule(mod).merged_weight()
        out[name] = t.detach().float().contiguous()
    if getattr(getattr(model, "config", None), "tie_embeddings", False):
        out.pop("lm_head.weight", None)  # stored once, as the embedding
    return out
