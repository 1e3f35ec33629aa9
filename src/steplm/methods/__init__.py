"""Pre-training methods as small registered objects (see ``base.Method``).

Adding a method means adding one module with a ``Method`` subclass and one line in ``REGISTRY``.
"""
from __future__ import annotations

from steplm.methods.apollo import Apollo
from steplm.methods.base import Method
from steplm.methods.galore import GaLore
from steplm.methods.relora import ReLoRA
from steplm.methods.step import Step, StepNoPet
from steplm.methods.vanilla import Vanilla

REGISTRY: dict[str, Method] = {m.name: m for m in (Vanilla(), Step(), StepNoPet(), ReLoRA(), GaLore(), Apollo())}


def get(name: str) -> Method:
    """The registered method called ``name`` (KeyError if there is none)."""
    return REGISTRY[name]


__all__ = ["Method", "REGISTRY", "get"]
