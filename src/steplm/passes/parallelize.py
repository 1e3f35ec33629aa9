"""The last passes over a model before it trains: the attention backward it uses, DDP or FSDP2
across ranks, and torch.compile of forward + loss as one graph; and the way back to a plain model
and optimizer (FSDP2) before a change of shape or a checkpoint. Each function takes the run (the
Trainer: ``model``, ``optimizer``, ``cfg``, ``world``, ``fsdp``) and updates it."""
from __future__ import annotations

import types

import torch

from steplm.model.llama import Attention


def own_code(method):
    """``method`` (a bound method) over its own copy of the code object. torch.compile keeps its
    compiled graphs and their guards on the code object, and stops compiling a code object after
    ``torch._dynamo.config.recompile_limit`` (8) of them: every stage of every Trainer in one process
    compiling the same loss function would reach it (a third 3-stage run in a sweep), and the rest
    would run eager without a word. A copy per (trainer, stage) holds one graph and is freed with it."""
    f = method.__func__
    g = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    g.__kwdefaults__, g.__qualname__ = f.__kwdefaults__, f.__qualname__
    return types.MethodType(g, method.__self__)


def fsdp_module_type():
    from torch.distributed.fsdp import FSDPModule
    return FSDPModule


def parallelize(run) -> None:
    """(Re)wrap after every change of the model's shape: the attention backward of train.
    attention_matmul_backward on every (new) layer, DDP or FSDP2 across ranks, then compile forward +
    loss as one graph (the cross-entropy over the vocabulary fuses with the head). Sets ``run.wrapped``
    and ``run.loss_fn``."""
    for m in run.model.modules():  # new layers of a growth start from the class default
        if isinstance(m, Attention):
            m.matmul_backward = run.cfg.train.attention_matmul_backward
    run.wrapped = run.model
    if run.fsdp:
        if not isinstance(run.model, fsdp_module_type()):
            shard(run)
    elif run.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        run.wrapped = DistributedDataParallel(run.model)
    run.loss_fn = torch.compile(own_code(run.loss)) if run.cfg.train.compile else run.loss


def shard(run) -> None:
    """FSDP2: shard each block and the root in place, then rebuild the optimizer over the shards,
    moving each parameter's state by name (parameters without state start fresh)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    names = {id(p): n for n, p in run.model.named_parameters()}
    state = {names[id(p)]: st for p, st in run.optimizer.state.items()}
    for block in run.model.model.layers:
        fully_shard(block)
    fully_shard(run.model)
    run.optimizer = run.build_optimizer()
    for name, p in run.model.named_parameters():
        if name in state:
            run.optimizer.state[p] = {k: distribute_tensor(v, p.device_mesh, p.placements)
                                      if torch.is_tensor(v) and v.dim() else v for k, v in state[name].items()}


def gather_plain(run):
    """FSDP2: the full model and optimizer rebuilt unwrapped on every rank (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from steplm.train.state import layer_layout, plain_model

    weights = get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True))
    names = {id(p): n for n, p in run.model.named_parameters()}
    state = {names[id(p)]: {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in st.items()}
             for p, st in run.optimizer.state.items()}
    model = plain_model(run.cfg, layer_layout(run.model), dict(weights), run.device)
    optimizer = run.build_optimizer(model=model)
    for name, p in model.named_parameters():
        if name in state:
            optimizer.state[p] = state[name]
    return model, optimizer


def unwrap(run) -> None:
    """FSDP2: make ``run.model`` and ``run.optimizer`` unwrapped again before a change of shape."""
    if run.fsdp:
        run.model, run.optimizer = gather_plain(run)
