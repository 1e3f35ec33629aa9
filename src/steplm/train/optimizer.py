"""The optimizer of a stage: AdamW (or the method's) over the trainable parameters only, rebuilt at
every growth so that the old layers' moments are freed."""
from __future__ import annotations

import torch


def build_optimizer(cfg, method, model: torch.nn.Module, previous: torch.optim.Optimizer | None = None,
                    fused: bool = True) -> torch.optim.Optimizer:
    """The method's optimizer over ``model``'s trainable parameters: 2-D weights decay, norms do not.
    The state of the embeddings, head and final norm (trainable in every stage) is carried over from
    ``previous``; every layer parameter, adapters included, starts fresh. Groups: [decay, no decay];
    with train.embedding_lr_scale != 1 the parameters outside the blocks move to two more groups,
    [decay, no decay], whose ``lr_scale`` multiplies the lr."""
    t = cfg.train
    split = t.embedding_lr_scale != 1.0
    decay, no_decay, outer_decay, outer_no_decay, carry = [], [], [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            outer = not name.startswith("model.layers.")
            if split and outer:
                (outer_decay if p.dim() >= 2 else outer_no_decay).append(p)
            else:
                (decay if p.dim() >= 2 else no_decay).append(p)
            if outer:
                carry.append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups += [{"params": ps, "weight_decay": wd, "lr_scale": t.embedding_lr_scale}
               for ps, wd in ((outer_decay, t.weight_decay), (outer_no_decay, 0.0)) if ps]
    opt = method.build_optimizer(cfg, model, groups, fused=fused)
    if previous is not None:
        for p in carry:
            if p in previous.state:
                opt.state[p] = previous.state[p]
    return opt


def clip_in_step(cfg, optimizer: torch.optim.Optimizer, sharded: bool) -> bool:
    """Whether the gradient clipping rides on the optimizer step (``grad_scale`` of torch's fused
    AdamW: the clip coefficient's inverse) instead of a pass rescaling the gradients first. The same
    update up to rounding; only where the step is torch's fused AdamW over local tensors."""
    return (bool(cfg.train.grad_clip) and type(optimizer) is torch.optim.AdamW
            and bool(optimizer.defaults.get("fused")) and not sharded)
