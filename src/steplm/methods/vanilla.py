"""Vanilla pre-training: every layer trainable from the first step, one cosine (paper Eq. 1)."""
from steplm.methods.base import Method


class Vanilla(Method):
    name = "vanilla"
