"""Depth growth operators, applied as a pass over a model's ``ModuleList``.

Insertion happens in the gaps between existing layers; gap g lies between old layers g and g+1.
A new layer in gap g is made from its two neighbours:
- interpolation-copy: phi_new = phi_g;
- interpolation-mean: phi_new = (phi_g + phi_(g+1)) / 2, for every parameter of the block, norms included.
Frozen neighbours contribute their effective weight (base + adapter update).
FPI additionally zeroes the new layer's o_proj and down_proj (weights and any biases), so its residual branches output 0
and growth preserves the function.

Positions (paper Fig. 3): ``upper`` uses the highest gaps (the k-th new layer sits between old
layers N-2-k and N-1-k), ``lower`` the lowest (between k and k+1), ``intermediate`` the gaps
closest to the middle, ``random`` a seeded random choice. When there are more new layers than gaps,
gaps are reused in the same order, so a gap may receive several layers.
"""
from __future__ import annotations

import random

import torch
import torch.nn as nn

from .lora import LoRALinear
from .model import Block, ModelConfig


def insertion_gaps(n_old: int, n_new: int, position: str, seed: int = 0) -> list[int]:
    """Gap index for each new layer, sorted; gap g means "after old layer g"."""
    n_gaps = max(1, n_old - 1)
    if position == "upper":
        order = list(range(n_gaps - 1, -1, -1))
    elif position == "lower":
        order = list(range(n_gaps))
    elif position == "intermediate":
        mid = (n_gaps - 1) / 2
        order = sorted(range(n_gaps), key=lambda g: (abs(g - mid), g))
    elif position == "random":
        order = list(range(n_gaps))
        random.Random(seed).shuffle(order)
    else:
        raise ValueError(f"unknown position {position!r}")
    return sorted(order[k % n_gaps] for k in range(n_new))


def effective_state(block: nn.Module) -> dict[str, torch.Tensor]:
    """A block's parameters as a plain-Block fp32 state dict (adapters merged, no lora_ keys)."""
    out = {}
    lora = {name: m for name, m in block.named_modules() if isinstance(m, LoRALinear)}
    for name, t in block.state_dict().items():
        if "lora_" in name:
            continue
        mod, leaf = name.rsplit(".", 1)
        out[name] = lora[mod].merged_weight() if mod in lora and leaf == "weight" else t.detach().float()
    return out


@torch.no_grad()
def make_layer(cfg: ModelConfig, lower: nn.Module, upper: nn.Module, init: str, fpi: bool, device) -> Block:
    """A new fp32 Block from two neighbouring blocks (a fresh module object, never a shared one)."""
    a = effective_state(lower)
    if init == "mean":
        b = effective_state(upper)
        state = {k: (a[k] + b[k]) / 2 for k in a}
    elif init == "copy":
        state = a
    else:
        raise ValueError(f"unknown init {init!r}")
    block = Block(cfg).to(device)
    block.load_state_dict(state)
    if fpi:  # the residual branches output exactly 0: weights and, in models with them, biases
        for out_proj in (block.self_attn.o_proj, block.mlp.down_proj):
            out_proj.weight.zero_()
            if out_proj.bias is not None:
                out_proj.bias.zero_()
    return block


def grow(model: nn.Module, n_new: int, init: str = "mean", position: str = "upper", fpi: bool = False,
         seed: int = 0) -> list[bool]:
    """Insert ``n_new`` layers in place; returns, per layer of the grown model, whether it is new."""
    old = list(model.model.layers)
    n_old = len(old)
    gaps = insertion_gaps(n_old, n_new, position, seed)
    device = next(model.parameters()).device
    layers, is_new = [], []
    for g, blk in enumerate(old):
        layers.append(blk)
        is_new.append(False)
        for _ in range(gaps.count(g)):
            layers.append(make_layer(model.config, blk, old[min(g + 1, n_old - 1)], init, fpi, device))
            is_new.append(True)
    model.model.layers = nn.ModuleList(layers)
    model.config.n_layers = len(layers)
    assert len({id(m) for m in layers}) == len(layers), "a module object appears twice"
    return is_new
