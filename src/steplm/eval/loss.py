"""Losses as the tables report them."""
from __future__ import annotations

import math


def perplexity_of(loss: float) -> float:
    """exp(loss), inf past float range (a mean loss above ~709 nats: a finite but hopeless model)."""
    return math.inf if loss >= 709 else math.exp(loss)  # NaN stays NaN
