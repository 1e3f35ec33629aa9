"""Depth growth operators, applied as a pass over a model's ``ModuleList``.

Insertion happens in the gaps between existing layers; gap g lies between old layers g and g+1.
A new layer in gap g is made from its two neighbours:
- interpolation-copy: phi_new = phi_g;
- interpolation-mean: phi_new = (phi_g + phi_(g+1)) / 2, for every parameter of the block, norms included.
Frozen neighbours contribute their effective weight (base + adapter update).
FPI additionally zeroes the new layer's o_proj and down_proj (weights and any biases), so its residual branches output 0
and growth preserves the function.

Positions (paper Sec. 5.2, Fig. 3; the paper describes Upper as new layers "added collectively at
the top", which admits two readings, both offered):
- ``upper`` (the default, and every committed STEP result before the ``top`` position existed):
  one new layer per gap, from the highest gap down: the k-th new layer sits between old layers
  N-2-k and N-1-k, made from those two. With more new layers than gaps, gaps are reused in the same
  order, so a gap may receive several layers. New layers therefore land among the upper old layers,
  not above them.
- ``top``: the literal reading. All new layers form one contiguous block above the last old layer.
  Each is initialised from the same pair of old neighbours that ``upper`` would give it (new layer
  j of the block, counted from the bottom, from the j-th of ``upper``'s gaps in ascending order), so
  ``top`` and ``upper`` differ in placement only.
- ``lower``: the lowest gaps first (the k-th new layer between old layers k and k+1);
  ``intermediate``: the gaps closest to the middle first; ``random``: a seeded random order of gaps.
"""
from __future__ import annotations

import random

import torch
import torch.nn as nn

from steplm.passes.lora import LoRALinear
from steplm.config.schema import ModelConfig
from steplm.model.llama import Block


def insertion_gaps(n_old: int, n_new: int, position: str, seed: int = 0) -> list[int]:
    """Gap index for each new layer, sorted; gap g means "after old layer g" (``top``: every new
    layer after the last old layer, n_old - 1)."""
    n_gaps = max(1, n_old - 1)
    if position == "top":
        return [n_old - 1] * n_new
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


def source_gaps(n_old: int, n_new: int, position: str, seed: int = 0) -> list[int]:
    """For each new layer in stack order, the gap g whose two old layers (g, g+1) it is made from:
    the gap it is inserted in, except at ``top``, whose block takes ``upper``'s sources."""
    return insertion_gaps(n_old, n_new, "upper" if position == "top" else position, seed)


def grow(model: nn.Module, n_new: int, init: str = "mean", position: str = "upper", fpi: bool = False,
         seed: int = 0) -> list[bool]:
    """Insert ``n_new`` layers in place; returns, per layer of the grown model, whether it is new."""
    old = list(model.model.layers)
    n_old = len(old)
    gaps = insertion_gaps(n_old, n_new, position, seed)
    sources = iter(source_gaps(n_old, n_new, position, seed))
    device = next(model.parameters()).device
    layers, is_new = [], []
    for g, blk in enumerate(old):
        layers.append(blk)
        is_new.append(False)
        for _ in range(gaps.count(g)):
            src = next(sources)
            layers.append(make_layer(model.config, old[src], old[min(src + 1, n_old - 1)], init, fpi, device))
            is_new.append(True)
    model.model.layers = nn.ModuleList(layers)
    model.config.n_layers = len(layers)
    assert len({id(m) for m in layers}) == len(layers), "a module object appears twice"
    return is_new
