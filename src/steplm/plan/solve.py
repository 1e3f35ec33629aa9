"""STEP's Eq. 3: the stage split n_1..n_K that minimises the largest stage's model-state bytes
(exactly, by dynamic programming, or by scipy's MILP for many stages), and the budget searches
built on it (the deepest model that fits). Pure: no torch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

from steplm.plan.memory import (
    FP32,
    FROZEN_BYTES,
    GB,
    TRAINABLE_BYTES,
    LayerShape,
    Precision,
    cumulative,
    layer_costs,
    lora_params_per_layer,
    params_per_layer,
    stage_bytes_from_costs,
)

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
                max_ties: int = MAX_TIES, costs: tuple[int, int] | None = None,
                first: int | None = None) -> Solution:
    """Exact min-max of Eq. 3 in integer bytes: bisection on the peak with an O(K) interval
    feasibility test, then every tied split (up to ``max_ties``) read off the same intervals.
    ``costs`` = (g, k) from ``layer_costs`` replaces the fp32 slopes (16·P, 2·P + 16·E).
    ``first`` fixes n_1 (a pretrained model's depth); the other n_i are optimised."""
    _check(n_layers, n_stages, first)
    g, k = costs or (TRAINABLE_BYTES * P, FROZEN_BYTES * P + TRAINABLE_BYTES * E)
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
               scale: bool = True, time_limit: float | None = MILP_TIME_LIMIT_S,
               costs: tuple[int, int] | None = None, first: int | None = None) -> list[int]:
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
    g, k = costs or (TRAINABLE_BYTES * P, FROZEN_BYTES * P + TRAINABLE_BYTES * E)
    unit = g if scale else 1
    grow, keep = g / unit, k / unit
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
    optimizer_states: str = "fp32"
    master_weights: str = "fp32"
    budget: dict | None = None
    """Budget mode: what was counted against the budget (bytes) and whether the precision and the
    stage count were chosen by the search (``steplm plan --budget-gb``)."""

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_split(layers_per_stage: list[int], shape: LayerShape, rank: int, prec: Precision = FP32) -> Plan:
    """Memory of a given split (no optimisation); vanilla at the same depth uses the same precision."""
    check_shape(shape)
    _check(sum(layers_per_stage), len(layers_per_stage))
    P, E = params_per_layer(shape), lora_params_per_layer(shape, rank)
    g, k = layer_costs(shape, rank, prec)
    stages = stage_bytes_from_costs(layers_per_stage, g, k)
    L = sum(layers_per_stage)
    peak, van = max(stages), g * L
    return Plan(list(layers_per_stage), cumulative(layers_per_stage), stages, peak, van, 1 - peak / van, P, E,
                optimizer_states=prec.optimizer_states, master_weights=prec.master_weights)


def optimize(n_layers: int, n_stages: int, shape: LayerShape, rank: int, cap_growth: bool = False,
             prec: Precision = FP32, first: int | None = None) -> Plan:
    """Eq. 3: the split minimising the largest stage at precision ``prec`` (with n_1 = ``first``
    when given: STEP from a pretrained model of that depth). HiGHS (up to MILP_MAX_STAGES stages,
    within MILP_TIME_LIMIT_S) is cross-checked against the exact solver, whose answer is returned
    (``solver`` says whether they agreed)."""
    check_shape(shape)
    P, E = params_per_layer(shape), lora_params_per_layer(shape, rank)
    costs = layer_costs(shape, rank, prec)
    sol = solve_exact(n_layers, n_stages, P, E, cap_growth, costs=costs, first=first)
    milp_split, why = None, ""
    if n_stages > MILP_MAX_STAGES:
        why = f"milp skipped: more than {MILP_MAX_STAGES} stages"
    else:
        try:
            milp_split = solve_milp(n_layers, n_stages, P, E, cap_growth, costs=costs, first=first)
        except ValueError as e:
            why = f"milp failed: {e}"
    if milp_split is not None:
        agree = max(stage_bytes_from_costs(milp_split, *costs)) == sol.peak
        why = "milp+exact (agree)" if agree else "exact (milp disagreed)"
    else:
        why = f"exact ({why})"
    # Deterministic choice among ties: the split that grows latest (largest n_1, then n_2, ...).
    plan = evaluate_split(sol.latest, shape, rank, prec)
    plan.tied_optima, plan.tied_optima_truncated = sol.ties, sol.truncated
    plan.solver = why
    plan.milp_layers_per_stage = milp_split
    return plan


def deepest_within(budget_bytes: float, n_stages: int, shape: LayerShape, rank: int,
                   cap_growth: bool = False, extra_bytes=lambda L: 0, max_layers: int = MAX_LAYERS,
                   prec: Precision = FP32) -> Plan:
    """Budget mode: the deepest model whose optimal peak (+ ``extra_bytes(L)``) fits ``budget_bytes``.

    The optimal peak never falls as L grows (drop a layer from the last stage holding two), so a
    binary search over L is exact. When even ``max_layers`` layers fit, the plan stops there and
    says so in ``capped_at_layers``.
    """
    hi = _deepest_layers(budget_bytes, n_stages, shape, rank, cap_growth, extra_bytes, max_layers, prec)
    max_layers = min(max_layers, MAX_LAYERS)
    plan = optimize(hi, n_stages, shape, rank, cap_growth, prec)
    if hi == max_layers:
        plan.capped_at_layers = max_layers
    return plan


MAX_SEARCH_STAGES = 8
"""Budget mode without a stage count searches K = 1 (vanilla) .. MAX_SEARCH_STAGES."""


def deepest_over(budget_bytes: float, stage_counts: list[int], precisions: list[Precision], shape: LayerShape,
                 rank: int, cap_growth: bool = False, extra_bytes=lambda L, prec: 0,
                 max_layers: int = MAX_LAYERS) -> Plan:
    """Budget mode over stage counts and state precisions: the deepest model that fits, ties going
    to fewer stages, then to the earlier precision in ``precisions`` (list the most precise first).
    Only the winner is cross-checked with HiGHS, so the search stays within the planner's bound."""
    best, last_error = None, None
    for prec in precisions:
        for K in stage_counts:
            try:
                L = _deepest_layers(budget_bytes, K, shape, rank, cap_growth, lambda n: extra_bytes(n, prec),
                                    max_layers, prec)
            except ValueError as e:
                last_error = e
                continue
            if best is None or L > best[0] or (L == best[0] and K < best[1]):
                best = (L, K, prec)
    if best is None:
        raise last_error
    L, K, prec = best
    plan = optimize(L, K, shape, rank, cap_growth, prec)
    if L == min(max_layers, MAX_LAYERS):
        plan.capped_at_layers = L
    return plan


def _deepest_layers(budget_bytes, n_stages, shape, rank, cap_growth, extra_bytes, max_layers, prec) -> int:
    """The largest L whose optimal Eq. 3 peak (+ extra_bytes(L)) fits the budget (ValueError if none)."""
    if not budget_bytes > 0:  # also refuses NaN
        raise ValueError(f"the budget must be a positive number of bytes, got {budget_bytes}")
    max_layers = min(max_layers, MAX_LAYERS)
    check_shape(shape)
    g, k = layer_costs(shape, rank, prec)

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
    return hi


