"""STEP's memory model (paper Eq. 1-5) and the Eq. 3 stage-split optimiser. Pure: no torch.

Bytes per parameter follow the paper's mixed-precision accounting: a trainable parameter costs
16 B (fp32 weight 4 + fp32 gradient 4 + Adam moments 8), a frozen one 2 B (bf16 weight, no
gradient, no optimizer state). The trainer stores tensors exactly this way, so the layer bytes it
measures equal ``stage_bytes`` here.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

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
    """Sizes of one decoder block. ffn_hidden None means the paper's 8/3·d exactly.

    The defaults describe the paper's block (Eq. 4/5): q and o are d×d, no biases. An imported
    model may differ: q_dim = n_heads·head_dim (head_dim need not be d/n_heads), kv_dim =
    n_kv_heads·head_dim, and HF's attention_bias / mlp_bias add bias vectors, which are parameters
    like any other (16 B trainable, 2 B frozen in bf16)."""
    d_model: int
    ffn_hidden: int | None = None
    kv_dim: int | None = None  # n_kv_heads·head_dim for GQA; None means d_model
    q_dim: int | None = None  # n_heads·head_dim; None means d_model
    attention_bias: bool = False
    """Biases on q, k, v and o (q_dim + 2·kv_dim + d_model parameters)."""
    mlp_bias: bool = False
    """Biases on gate, up and down (2·ffn_hidden + d_model parameters)."""

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of the seven linears: q, k, v, o, gate, up, down."""
        d, kv, q = self.d_model, self.kv_dim or self.d_model, self.q_dim or self.d_model
        f = self.ffn_hidden
        return [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]

    def bias_params(self) -> int:
        """Bias parameters of one block (0 for the paper's block)."""
        d, kv, q = self.d_model, self.kv_dim or self.d_model, self.q_dim or self.d_model
        n = q + 2 * kv + d if self.attention_bias else 0
        if self.mlp_bias:
            if self.ffn_hidden is None:
                raise ValueError("mlp_bias needs the real FFN width (ffn_hidden)")
            n += 2 * self.ffn_hidden + d
        return n


def params_per_layer(shape: LayerShape) -> int:
    """Eq. 4 generalised: parameters of one block (attention + SwiGLU + two RMSNorm vectors + biases)."""
    d, kv, q = shape.d_model, shape.kv_dim or shape.d_model, shape.q_dim or shape.d_model
    attn = 2 * d * q + 2 * d * kv
    mlp = 8 * d * d if shape.ffn_hidden is None else 3 * d * shape.ffn_hidden
    return attn + mlp + 2 * d + shape.bias_params()  # paper default: 12d² + 2d


def lora_params_per_layer(shape: LayerShape, rank: int) -> int:
    """Eq. 5 generalised: adapter parameters r·(in+out) summed over the seven linears (paper: 19·r·d)."""
    if shape.ffn_hidden is None:
        d, kv, q = shape.d_model, shape.kv_dim or shape.d_model, shape.q_dim or shape.d_model
        # q and o: r·(d + q) each; k and v: r·(d + kv) each; gate, up, down with f = 8/3·d: 11·r·d
        return rank * (4 * d + 2 * q + 2 * kv) + 11 * rank * d
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
    the two norms and any biases are plain AdamW (16 B each)."""
    total = TRAINABLE_BYTES * (2 * shape.d_model + shape.bias_params())  # norms and biases: plain AdamW
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
# Bounds on the planner's inputs. The exact solver is O(K·log(peak)), so they are far above any real
# model (the deepest LLaMA has 126 layers) and exist to answer every input within a second; the
# HiGHS cross-check is run only up to MILP_MAX_STAGES stages.
MAX_LAYERS = 1_000_000
MAX_STAGES = 1024
MAX_WIDTH = 1 << 20  # d_model, ffn_hidden, kv_dim, q_dim
MAX_TIES = 64  # tied optima listed (the count can grow exponentially with K)
MILP_MAX_STAGES = 64
MILP_TIME_LIMIT_S = 0.3


def _check(n_layers: int, n_stages: int, first: int | None = None):
    if not 1 <= n_layers <= MAX_LAYERS:
        raise ValueError(f"layer count must be in [1, {MAX_LAYERS}], got {n_layers}")
    if not 1 <= n_stages <= min(n_layers, MAX_STAGES):
        raise ValueError(f"stage count must be in [1, {min(n_layers, MAX_STAGES)}], got {n_stages}")
    if first is not None and not 1 <= first <= n_layers - n_stages + 1:
        raise ValueError(f"a first stage of {first} layers leaves no room for {n_stages - 1} more stages "
                         f"within {n_layers} layers")


def check_shape(shape: LayerShape):
    """Raise ValueError unless every width of ``shape`` is a positive integer within MAX_WIDTH."""
    for name in ("d_model", "ffn_hidden", "kv_dim", "q_dim"):
        v = getattr(shape, name)
        if v is not None and not 1 <= v <= MAX_WIDTH:
            raise ValueError(f"{name} must be in [1, {MAX_WIDTH}], got {v}")


class _Stages:
    """Eq. 3's constraints for a candidate peak M, as intervals of cumulative layer counts.

    Stage i (1-based) adding n layers on top of N = N_(i-1) costs g·n + k·N bytes with g = 16·P and
    k = 2·P + 16·E. Under peak M the most layers stage i can reach from N is
    top(i, N) = floor((M + (g - k)·N) / g) (and at most 2·N with cap_growth), and it can add one at
    all only if N <= (M - g) // k. Both bounds are monotone in N, so the counts reachable after each
    stage, and those from which exactly L layers can still be reached, are integer intervals.
    With ``first`` (a pretrained model's depth) stage 1 adds exactly that many layers.
    """

    def __init__(self, n_layers, n_stages, g, k, cap_growth, M, first=None):
        self.L, self.K, self.g, self.k, self.cap, self.M = n_layers, n_stages, g, k, cap_growth, M
        self.first = first
        self.x_max = (M - g) // k  # largest N from which one more layer fits

    def top(self, i: int, N: int) -> int:
        t = (self.M + (self.g - self.k) * N) // self.g
        if i == 1:
            return t if self.first is None else min(t, self.first)
        return min(t, 2 * N) if self.cap else t

    def low(self, i: int, N: int) -> int:
        """The fewest layers the model can have after stage i, from N after stage i-1."""
        return self.first if i == 1 and self.first is not None else N + 1

    def feasible(self) -> bool:
        """Whether some split has every stage within M (forward interval reach, O(K))."""
        lo = hi = 0
        for i in range(1, self.K + 1):
            b = min(hi, self.x_max)
            if b < lo:
                return False
            cands = {lo, b}
            if self.cap and i > 1 and self.g < self.k:  # min(decreasing, 2N) peaks where they cross
                x = self.M // (self.g + self.k)
                cands |= {min(max(x, lo), b), min(max(x + 1, lo), b)}
            lo, hi = (lo + 1 if i > 1 or self.first is None else self.first), \
                min(self.L, max(self.top(i, x) for x in cands))
            if hi < lo:
                return False
        return hi >= self.L

    def backward(self) -> list[tuple[int, int]]:
        """back[i] = (a, b): the N_i from which exactly L layers are reachable in the remaining stages."""
        back = [(0, -1)] * (self.K + 1)
        back[self.K] = (self.L, self.L)
        g, k, M = self.g, self.k, self.M
        for i in range(self.K, 0, -1):
            a, b = back[i]
            lo, hi = i - 1, min(b - 1, self.x_max)
            r = a * g - M  # top(i, x) >= a  <=>  (g - k)·x >= r  (and 2x >= a with the cap)
            if g > k:
                lo = max(lo, -(-r // (g - k)))
            elif g < k:
                hi = min(hi, (-r) // (k - g))
            elif r > 0:
                hi = lo - 1
            if self.cap and i > 1:
                lo = max(lo, -(-a // 2))
            back[i - 1] = (lo, hi)
        return back


class Solution(NamedTuple):
    peak: int
    """Optimal peak of Eq. 3 in bytes."""
    ties: list[list[int]]
    """Splits attaining it, in lexicographic order (the first MAX_TIES)."""
    truncated: bool
    """More splits tie than ``ties`` lists."""
    latest: list[int]
    """The tied split that grows latest (largest n_1, then n_2, ...)."""


def solve_exact(n_layers: int, n_stages: int, P: int, E: int, cap_growth: bool = False,
                max_ties: int = MAX_TIES, first: int | None = None) -> Solution:
    """Exact min-max of Eq. 3 in integer bytes: bisection on the peak with an O(K) interval
    feasibility test, then every tied split (up to ``max_ties``) read off the same intervals.
    ``first`` fixes n_1 (a pretrained model's depth); the other n_i are optimised."""
    _check(n_layers, n_stages, first)
    g, k = TRAINABLE_BYTES * P, FROZEN_BYTES * P + TRAINABLE_BYTES * E
    lo, hi = 0, (g + k) * n_layers  # infeasible, feasible (n = L-K+1, 1, ..., 1 fits under hi)
    if not _Stages(n_layers, n_stages, g, k, cap_growth, hi, first).feasible():
        raise ValueError("no split satisfies the constraints")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _Stages(n_layers, n_stages, g, k, cap_growth, mid, first).feasible() else (mid, hi)
    st = _Stages(n_layers, n_stages, g, k, cap_growth, hi, first)
    back = st.backward()

    def choices(i: int, N: int) -> tuple[int, int]:  # the N_i allowed after N_(i-1) = N
        a, b = back[i]
        return max(st.low(i, N), a), min(st.top(i, N), b)

    latest, N = [], 0
    for i in range(1, n_stages + 1):
        nxt = choices(i, N)[1]
        latest.append(nxt - N)
        N = nxt
    # Depth-first, smallest N_i first: every branch ends in an optimal split, so this is
    # O(K·(listed + 1)), and the splits come out in lexicographic order.
    ties, path, ends = [], [], []
    first, last = choices(1, 0)
    path.append(first)
    ends.append(last)
    truncated = False
    while path:
        if len(path) == n_stages:
            if len(ties) == max_ties:
                truncated = True
                break
            ties.append([b - a for a, b in zip([0] + path, path)])
            while path and path[-1] == ends[-1]:
                path.pop()
                ends.pop()
            if path:
                path[-1] += 1
        else:
            first, last = choices(len(path) + 1, path[-1])
            path.append(first)
            ends.append(last)
    return Solution(hi, ties, truncated, latest)


def solve_milp(n_layers: int, n_stages: int, P: int, E: int, cap_growth: bool = False,
               scale: bool = True, time_limit: float | None = MILP_TIME_LIMIT_S, first: int | None = None) -> list[int]:
    """Eq. 3 as an integer program solved by HiGHS (scipy.optimize.milp).

    Variables are n_1..n_K (integers >= 1) and the peak M. With ``scale`` the stage constraints are
    divided by 16·P, so coefficients are O(1): in raw bytes HiGHS has returned a non-optimal
    "optimal" vector (d 2048, L 24, K 10). Raises ValueError when HiGHS finds no optimum within
    ``time_limit`` seconds.
    """
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    _check(n_layers, n_stages, first)
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
    lower, upper = np.r_[np.ones(K), 0.0], np.r_[np.full(K, n_layers), np.inf]
    if first is not None:  # n_1 fixed: a pretrained model's depth
        lower[0] = upper[0] = first
    res = milp(c, constraints=rows, integrality=np.r_[np.ones(K), 0.0], bounds=Bounds(lower, upper),
               options={"mip_rel_gap": 0.0, **({"time_limit": time_limit} if time_limit else {})})
    if res.status == 1:
        raise ValueError(f"timed out after {time_limit} s")
    if not res.success or res.x is None:
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
    tied_optima_truncated: bool = False
    solver: str = "given"
    milp_layers_per_stage: list[int] | None = None
    extended: dict | None = None
    capped_at_layers: int | None = None
    """Budget mode: the budget fits deeper models than the planner's layer bound, which it stopped at."""

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_split(layers_per_stage: list[int], shape: LayerShape, rank: int) -> Plan:
    """Memory of a given split (no optimisation)."""
    check_shape(shape)
    _check(sum(layers_per_stage), len(layers_per_stage))
    P, E = params_per_layer(shape), lora_params_per_layer(shape, rank)
    stages = stage_bytes(layers_per_stage, P, E)
    L = sum(layers_per_stage)
    peak, van = max(stages), vanilla_bytes(L, P)
    return Plan(list(layers_per_stage), cumulative(layers_per_stage), stages, peak, van, 1 - peak / van, P, E)


def optimize(n_layers: int, n_stages: int, shape: LayerShape, rank: int, cap_growth: bool = False,
             first: int | None = None) -> Plan:
    """Eq. 3: the split minimising the largest stage (with n_1 = ``first`` when given: STEP from a
    pretrained model of that depth). HiGHS (up to MILP_MAX_STAGES stages, within MILP_TIME_LIMIT_S)
    is cross-checked against the exact solver, whose answer is returned (``solver`` says whether
    they agreed)."""
    check_shape(shape)
    P, E = params_per_layer(shape), lora_params_per_layer(shape, rank)
    sol = solve_exact(n_layers, n_stages, P, E, cap_growth, first=first)
    milp_split, why = None, ""
    if n_stages > MILP_MAX_STAGES:
        why = f"milp skipped: more than {MILP_MAX_STAGES} stages"
    else:
        try:
            milp_split = solve_milp(n_layers, n_stages, P, E, cap_growth, first=first)
        except ValueError as e:
            why = f"milp failed: {e}"
    if milp_split is not None:
        why = "milp+exact (agree)" if max(stage_bytes(milp_split, P, E)) == sol.peak else "exact (milp disagreed)"
    else:
        why = f"exact ({why})"
    # Deterministic choice among ties: the split that grows latest (largest n_1, then n_2, ...).
    plan = evaluate_split(sol.latest, shape, rank)
    plan.tied_optima, plan.tied_optima_truncated = sol.ties, sol.truncated
    plan.solver = why
    plan.milp_layers_per_stage = milp_split
    return plan


def deepest_within(budget_bytes: float, n_stages: int, shape: LayerShape, rank: int,
                   cap_growth: bool = False, extra_bytes=lambda L: 0, max_layers: int = MAX_LAYERS) -> Plan:
    """Budget mode: the deepest model whose optimal peak (+ ``extra_bytes(L)``) fits ``budget_bytes``.

    The optimal peak never falls as L grows (drop a layer from the last stage holding two), so a
    binary search over L is exact. When even ``max_layers`` layers fit, the plan stops there and
    says so in ``capped_at_layers``.
    """
    if not budget_bytes > 0:  # also refuses NaN
        raise ValueError(f"the budget must be a positive number of bytes, got {budget_bytes}")
    max_layers = min(max_layers, MAX_LAYERS)
    check_shape(shape)
    P, E = params_per_layer(shape), lora_params_per_layer(shape, rank)
    g, k = TRAINABLE_BYTES * P, FROZEN_BYTES * P + TRAINABLE_BYTES * E

    def fits(L):  # one O(K) feasibility pass under the bytes the layers may use
        room = budget_bytes - extra_bytes(L)
        if room == math.inf:  # a budget beyond float range fits every depth
            return True
        return room >= 0 and _Stages(L, n_stages, g, k, cap_growth, math.floor(room)).feasible()

    lo = n_stages
    if lo > max_layers:
        raise ValueError(f"stage count must be at most {max_layers}, got {lo}")
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
    plan = optimize(hi, n_stages, shape, rank, cap_growth)
    if hi == max_layers:
        plan.capped_at_layers = max_layers
    return plan


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
