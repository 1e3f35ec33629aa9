"""Training FLOPs accounting (paper App. E). Pure: no torch.

Two conventions, always labelled:
- ``paper``: C = (6·N_trainable + 2·N_frozen)·T over non-embedding parameters (adapters count as
  trainable). A frozen layer is charged its forward pass only.
- ``corrected``: frozen layers that still pass gradients (all of them in STEP, because adapters,
  embeddings or lower layers need the gradient) cost 4·N (forward + input-gradient matmuls); it
  also charges the LM head (6·V·d) and attention scores (12·s·d per layer per token, PaLM's count,
  without the causal halving).
"""
from __future__ import annotations


def flops_per_token(n_trainable: int, n_frozen: int, convention: str = "paper", *, n_layers: int = 0,
                    d_model: int = 0, seq_len: int = 0, vocab_size: int = 0, head_trainable: bool = True) -> int:
    """Training FLOPs per token for non-embedding trainable/frozen parameter counts."""
    if convention == "paper":
        return 6 * n_trainable + 2 * n_frozen
    if convention == "corrected":
        head = (6 if head_trainable else 4) * vocab_size * d_model
        attention = 12 * n_layers * seq_len * d_model
        return 6 * n_trainable + 4 * n_frozen + head + attention
    raise ValueError(f"unknown FLOPs convention {convention!r}")


def vanilla_flops(n_params_nonemb: int, tokens: int) -> int:
    """The paper's C = 6·N·T."""
    return 6 * n_params_nonemb * tokens


def split_budget(budget: float, costs_per_step: list[float], growth_fraction: float) -> list[int]:
    """Steps per stage so that total FLOPs equal ``budget``.

    Every stage has the same nominal length S; stages 1..K-1 grow after growth_fraction·S steps and
    the last runs all S: f·S·Σ_(i<K) c_i + S·c_K = budget.
    """
    *early, last = costs_per_step
    S = budget / (growth_fraction * sum(early) + last)
    steps = [max(1, round(growth_fraction * S)) for _ in early]
    spent = sum(s * c for s, c in zip(steps, early))
    steps.append(max(1, round((budget - spent) / last)))
    return steps


def nominal_lengths(steps: list[int], growth_fraction: float) -> list[int]:
    """The cosine-schedule length of each stage: early stages are cut at growth_fraction of it."""
    return [max(s, round(s / growth_fraction)) for s in steps[:-1]] + [steps[-1]]
