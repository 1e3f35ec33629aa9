"""STEP's memory model (paper Eq. 1-5) and the Eq. 3 stage-split optimiser. Pure: no torch.

Bytes per parameter follow the paper's mixed-precision accounting: a trainable parameter costs
16 B (fp32 weight 4 + fp32 gradient 4 + Adam moments 8), a frozen one 2 B (bf16 weight, no
gradient, no optimizer state). The trainer stores tensors exactly this way, so the layer bytes it
measures equal ``stage_bytes`` here.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from functools import lru_cache

TRAINABLE_BYTES = 16
FROZEN_BYTES = 2
GB = 1e9

PRESETS = {
    # d, L, K, r: the paper's Table 1 rows (r = 128)
    "368m": dict(d_model=1600, n_layers=12, n_stages=2, lora_rank=128),
    "680m": dict(d_model=1536, n_layers=24, n_stages=2, lora_rank=128),
    "1.2b": dict(d_model=2048, n_layers=24, n_stages=2, lora_rank=128),
    "1.2b-3stage": dict(d_model=2048, n_layers=24, n_stages=3, lora_rank=128),
}


@dataclass(frozen=True)
class LayerShape:
    """Sizes of one decoder block. ffn_hidden None means the paper's 8/3·d exactly."""
    d_model: int
    ffn_hidden: int | None = None
    kv_dim: int | None = None  # n_kv_heads·head_dim for GQA; None means d_model

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of the seven linears: q, k, v, o, gate, up, down."""
        d, kv = self.d_model, self.kv_dim or self.d_model
        f = self.ffn_hidden
        return [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]


def params_per_layer(shape: LayerShape) -> int:
    """Eq. 4 generalised: parameters of one block (attention + SwiGLU + two RMSNorm vectors)."""
    d, kv = shape.d_model, shape.kv_dim or shape.d_model
    attn = 2 * d * d + 2 * d * kv
    mlp = 8 * d * d if shape.ffn_hidden is None else 3 * d * shape.ffn_hidden
    return attn + mlp + 2 * d  # paper default: 12d² + 2d


def lora_params_per_layer(shape: LayerShape, rank: int) -> int:
    """Eq. 5 generalised: adapter parameters r·(in+out) summed over the seven linears (paper: 19·r·d)."""
    if shape.ffn_hidden is None:
        d, kv = shape.d_model, shape.kv_dim or shape.d_model
        return rank * (4 * d + 4 * kv) + 11 * rank * d
    return sum(rank * (i + o) for i, o in shape.linears())


def vanilla_bytes(n_layers: int, P: int) -> int:
    """Eq. 1: model-state bytes of the transformer layers of a vanilla model."""
    return TRAINABLE_BYTES * n_layers * P


def stage_bytes(layers_per_stage: list[int], P: int, E: int) -> list[int]:
    """Eq. 2 for every stage: 16·n_i·P + 2·N_(i-1)·P + 16·N_(i-1)·E bytes."""
    out, before = [], 0
    for n in layers_per_stage:
        out.append(TRAINABLE_BYTES * n * P + FROZEN_BYTES * before * P + TRAINABLE_BYTES * before * E)
        before += n
    return out


def relora_bytes(n_layers: int, P: int, E: int, norm_params: int) -> int:
    """ReLoRA's LoRA phase: linears frozen in bf16 (2 B), norms and adapters trainable (16 B)."""
    return FROZEN_BYTES * n_layers * (P - norm_params) + TRAINABLE_BYTES * n_layers * (norm_params + E)


def galore_layer_bytes(shape: LayerShape, rank: int) -> int:
    """GaLore (proj_type std) for one block: each m×n linear keeps fp32 weight and gradient (8·m·n),
    Adam moments of the projected gradient (8·r·max(m, n)) and the projection (4·r·min(m, n));
    the two norms are plain AdamW (16 B each)."""
    total = TRAINABLE_BYTES * 2 * shape.d_model
    for n_in, n_out in _real_linears(shape):
        r = min(rank, n_in, n_out)
        total += 8 * n_in * n_out + 8 * r * max(n_in, n_out) + 4 * r * min(n_in, n_out)
    return total


def _real_linears(shape: LayerShape) -> list[tuple[int, int]]:
    if shape.ffn_hidden is None:
        raise ValueError("GaLore bytes need the real FFN width (ffn_hidden)")
    return shape.linears()


def cumulative(layers_per_stage: list[int]) -> list[int]:
    return list(itertools.accumulate(layers_per_stage))


# ---------------------------------------------------------------------------- Eq. 3 solvers
def _check(n_layers: int, n_stages: int):
    if n_layers < 1:
        raise ValueError(f"layer count must be positive, got {n_layers}")
    if not 1 <= n_stages <= n_layers:
        raise ValueError(f"stage count must be in [1, {n_layers}], got {n_stages}")


def solve_dp(n_layers: int, n_stages: int, P: int, E: int, cap_growth: bool = False) -> tuple[int, list[list[int]]]:
    """Exact min-max of Eq. 3 in integer bytes, and every split that attains it (lexicographic order)."""
    _check(n_layers, n_stages)
    grow = TRAINABLE_BYTES * P
    keep = FROZEN_BYTES * P + TRAINABLE_BYTES * E

    @lru_cache(maxsize=None)
    def best(i: int, before: int) -> float:
        if i == n_stages:
            return 0 if before == n_layers else float("inf")
        left = n_stages - i - 1
        hi = n_layers - before - left
        if cap_growth and i > 0:
            hi = min(hi, before)
        return min((max(grow * n + keep * before, best(i + 1, before + n)) for n in range(1, hi + 1)),
                   default=float("inf"))

    peak = best(0, 0)
    if peak == float("inf"):
        raise ValueError("no split satisfies the constraints")
    splits: list[list[int]] = []

    def collect(i: int, before: int, prefix: list[int]):
        if i == n_stages:
            splits.append(prefix)
            return
        for n in range(1, n_layers - before + 1):
            if cap_growth and i > 0 and n > before:
                break
            if grow * n + keep * before <= peak and best(i + 1, before + n) <= peak:
                collect(i + 1, before + n, prefix + [n])

    collect(0, 0, [])
    return int(peak), splits


def solve_milp(n_layers: int, n_stages: int, P: int, E: int, cap_growth: bool = False,
               scale: bool = True) -> list[int]:
    """Eq. 3 as an integer program solved by HiGHS (scipy.optimize.milp).

    Variables are n_1..n_K (integers >= 1) and the peak M. With ``scale`` the stage constraints are
    divided by 16·P, so coefficients are O(1): in raw bytes HiGHS has returned a non-optimal
    "optimal" vector (d 2048, L 24, K 10).
    """
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    _check(n_layers, n_stages)
    K = n_stages
    unit = TRAINABLE_BYTES * P if scale else 1
    grow = TRAINABLE_BYTES * P / unit
    keep = (FROZEN_BYTES * P + TRAINABLE_BYTES * E) / unit
    A = np.zeros((K, K + 1))
    for i in range(K):
        A[i, :i] = keep
        A[i, i] = grow
        A[i, K] = -1.0
    rows = [LinearConstraint(A, -np.inf, 0.0),
            LinearConstraint(np.r_[np.ones(K), 0.0][None, :], n_layers, n_layers)]
    if cap_growth and K > 1:
        C = np.zeros((K - 1, K + 1))
        for i in range(1, K):
            C[i - 1, :i] = -1.0
            C[i - 1, i] = 1.0
        rows.append(LinearConstraint(C, -np.inf, 0.0))
    c = np.zeros(K + 1)
    c[K] = 1.0
    res = milp(c, constraints=rows, integrality=np.r_[np.ones(K), 0.0],
               bounds=Bounds(np.r_[np.ones(K), 0.0], np.r_[np.full(K, n_layers), np.inf]))
    if not res.success:
        raise ValueError(f"HiGHS found no solution: {res.message}")
    return [int(round(v)) for v in res.x[:K]]


# ---------------------------------------------------------------------------- plans
@dataclass
class Plan:
    """A stage split and its memory, in bytes."""
    layers_per_stage: list[int]
    cumulative_layers: list[int]
    stage_bytes: list[int]
    peak_bytes: int
    vanilla_bytes: int
    reduction: float
    params_per_layer: int
    lora_params_per_layer: int
    tied_optima: list[list[int]] = field(default_factory=list)
    solver: str = "given"
    milp_layers_per_stage: list[int] | None = None
    extended: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_split(layers_per_stage: list[int], shape: LayerShape, rank: int) -> Plan:
    """Memory of a given split (no optimisation)."""
    P, E = params_per_layer(shape), lora_params_per_layer(shape, rank)
    stages = stage_bytes(layers_per_stage, P, E)
    L = sum(layers_per_stage)
    peak, van = max(stages), vanilla_bytes(L, P)
    return Plan(list(layers_per_stage), cumulative(layers_per_stage), stages, peak, van, 1 - peak / van, P, E)


def optimize(n_layers: int, n_stages: int, shape: LayerShape, rank: int, cap_growth: bool = False) -> Plan:
    """Eq. 3: the split minimising the largest stage. HiGHS is cross-checked against the exact DP;
    the DP answer is returned when they disagree (``solver`` says which)."""
    P, E = params_per_layer(shape), lora_params_per_layer(shape, rank)
    peak, ties = solve_dp(n_layers, n_stages, P, E, cap_growth)
    try:
        milp_split = solve_milp(n_layers, n_stages, P, E, cap_growth)
    except ValueError:
        milp_split = None
    milp_ok = milp_split is not None and max(stage_bytes(milp_split, P, E)) == peak
    # Deterministic choice among ties: the split that grows latest (largest n_1, then n_2, ...).
    chosen = max(ties)
    plan = evaluate_split(chosen, shape, rank)
    plan.tied_optima = ties
    plan.solver = "milp+dp (agree)" if milp_ok else "dp (milp disagreed)"
    plan.milp_layers_per_stage = milp_split
    return plan


def deepest_within(budget_bytes: float, n_stages: int, shape: LayerShape, rank: int,
                   cap_growth: bool = False, extra_bytes=lambda L: 0, max_layers: int = 4096) -> Plan:
    """Budget mode: the deepest model whose optimal peak (+ ``extra_bytes(L)``) fits ``budget_bytes``.

    The optimal peak never falls as L grows (drop a layer from the last stage holding two), so a
    binary search over L is exact.
    """
    def fits(L):
        return optimize(L, n_stages, shape, rank, cap_growth).peak_bytes + extra_bytes(L) <= budget_bytes

    lo = n_stages
    if not fits(lo):
        raise ValueError(f"even {lo} layers in {lo} stages need more than {budget_bytes / GB:.3g} GB")
    hi = lo
    while hi < max_layers and fits(min(2 * hi, max_layers)):
        hi = min(2 * hi, max_layers)
    if hi < max_layers:
        top = min(2 * hi, max_layers)
        while top - hi > 1:  # fits(hi) and not fits(top)
            mid = (hi + top) // 2
            hi, top = (mid, top) if fits(mid) else (hi, mid)
    return optimize(hi, n_stages, shape, rank, cap_growth)


# ---------------------------------------------------------------------------- extended model
def head_state_bytes(vocab_size: int, d_model: int, tied: bool = False) -> int:
    """Embedding + LM head + final norm, trainable in every stage (16 B per parameter)."""
    return TRAINABLE_BYTES * (vocab_size * d_model * (1 if tied else 2) + d_model)


def activation_bytes(n_layers: int, d_model: int, n_heads: int, seq_len: int, micro_batch: int,
                     vocab_size: int, checkpointing: bool = False) -> int:
    """Activation estimate (Korthikanti et al. 2022, 16-bit activations): s·b·d·(34 + 5·a·s/d) bytes per
    layer; with full activation checkpointing 2·s·b·d per layer plus one layer recomputed. The logits
    add 8·s·b·V (fp32 logits and their gradient). An estimate, not a measurement."""
    s, b, d = seq_len, micro_batch, d_model
    per_layer = int(s * b * d * (34 + 5 * n_heads * s / d))
    layers = (2 * s * b * d * n_layers + per_layer) if checkpointing else per_layer * n_layers
    return layers + 8 * s * b * vocab_size
