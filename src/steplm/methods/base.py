"""The method protocol: what one pre-training method plans and what it does to the model.

A method is a small object. Its planning half is pure (no torch import, like ``planner.py``): the
layers each stage adds, the parameter counts of each stage, the steps each stage gets and the
model-state bytes it holds. ``stages.plan_run`` assembles these into the ``StagePlan`` that the
trainer, ``steplm plan CONFIG`` and the benchmarks all read. Its training half is a few hooks that
the one ``Trainer`` calls: ``enter_stage`` (a pass over the model at a stage boundary: grow, freeze,
add adapters), ``build_optimizer`` and ``after_optimizer_step`` (ReLoRA's merge and reset). The
hooks receive the run (the ``Trainer``: ``model``, ``cfg``, ``gen``, ``optimizer``, ``step_in_stage``,
``current_stage``, ``merge_rows``) and import torch lazily, so importing a method stays pure.
"""
from __future__ import annotations

from steplm.plan import flops as flops_mod
from steplm.plan import memory

CONVENTIONS = ("paper", "corrected")


def layer_shape(model_cfg) -> memory.LayerShape:
    """The planner's view of one decoder block of a ``ModelConfig``: its real widths and biases."""
    m = model_cfg
    return memory.LayerShape(m.d_model, m.ffn_hidden, m.n_kv_heads * m.head_dim, m.n_heads * m.head_dim,
                              m.attention_bias, m.mlp_bias)


def init_depth(cfg) -> int | None:
    """Layers of the model stage 1 starts from (model.init_from's depth), None without one. Reads only
that folder's config, which config validation has checked."""
    if not cfg.model.init_from:
        return None
    from steplm.io.run_dir import read_config
    return read_config(cfg.model.init_from).n_layers


def precision(cfg) -> memory.Precision:
    """The run's optimizer-state and master-weight precision (train.optimizer_states, train.master_weights)."""
    return memory.Precision(cfg.train.optimizer_states, cfg.train.master_weights)


def tokens_per_step(cfg) -> int:
    """Tokens in one optimizer step, the global batch: micro_batch · grad_accum · seq_len per process,
    times the WORLD_SIZE processes torchrun starts (1 without it), as the trainer counts them."""
    import os
    t = cfg.train
    return t.micro_batch * t.grad_accum * t.seq_len * max(1, int(os.environ.get("WORLD_SIZE") or 1))


def flops_per_token(cfg, counts: dict, convention: str) -> int:
    """Training FLOPs per token of a stage with these non-embedding parameter counts (``flops.py``)."""
    m = cfg.model
    return flops_mod.flops_per_token(counts["trainable"], counts["frozen"], convention, n_layers=counts["layers"],
                                     d_model=m.d_model, seq_len=cfg.train.seq_len, vocab_size=m.vocab_size)


def full_rank_counts(cfg) -> dict:
    """Counts of the vanilla model at the final depth: every layer trainable."""
    L, P = cfg.model.n_layers, memory.params_per_layer(layer_shape(cfg.model))
    return {"layers": L, "new_layers": L, "trainable": L * P, "frozen": 0, "lora": 0}


def vanilla_budget(cfg, convention: str) -> float:
    """FLOPs of vanilla training for ``train.max_steps`` steps at the final depth."""
    return float(flops_per_token(cfg, full_rank_counts(cfg), convention)) * cfg.train.max_steps * tokens_per_step(cfg)


def split_projected(model, groups: list[dict]) -> tuple[list, list[dict]]:
    """The layers' *_proj weights in the decaying group ``groups[0]`` (which GaLore and APOLLO
    project), and ``groups`` without them (empty groups dropped), both in parameter order."""
    targets = {id(p) for n, p in model.named_parameters()
               if n.startswith("model.layers.") and n.endswith("_proj.weight")}
    projected = [p for p in groups[0]["params"] if id(p) in targets]
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in targets]} for g in groups]
    return projected, [g for g in rest if g["params"]]


def restart_ramp(cfg, step_in_stage: int) -> float:
    """ReLoRA's jagged-cosine factor at ``step_in_stage``: a linear re-warmup over lora.relora_warmup R
    steps after each reset, (j+1)/R on the j-th step after it, so the R-th is back on the cosine (1.0),
    as train.warmup_steps' last step is on the peak."""
    k, ramp = cfg.lora.relora_interval, cfg.lora.relora_warmup
    return min(1.0, (step_in_stage % k + 1) / ramp)


def merge_adapters(run, optimizer=None, prune_ratio=None) -> int:
    """Fold every adapter into its frozen base and re-initialise it (``merge_and_reinit``), and
    queue a metrics row with the share of the update that the rounding into bf16 kept. Warns once
    when that share falls below 0.9. ``run``: the Trainer. Returns the number of adapters merged."""
    import sys

    from steplm.passes.lora import merge_and_reinit

    lo, stats = run.cfg.lora, {}
    n = merge_and_reinit(run.model, optimizer, run.gen, prune_ratio, lo.merge_rounding, stats)
    share = stats.get("kept_share")
    if share is None:
        return n
    run.merge_rows.append({"step": run.step, "stage": run.stage + 1, "merge_kept_share": share,
                            "merge_update_rms_ratio": stats["update_rms_ratio"],
                            "merge_rounding": lo.merge_rounding, "merged_adapters": n})
    if share < 0.9 and not run.warned_merge and run.main:
        run.warned_merge = True
        print(f"steplm: warning: step {run.step}: rounding the merged adapters into bf16 kept {share:.0%} of "
              f"their update (update/weight rms {stats['update_rms_ratio']:.1e}); merge larger updates with a "
              f"longer lora.relora_interval or a higher train.lr, or set lora.merge_rounding=stochastic",
              file=sys.stderr)
    return n


def relora_reset(run) -> None:
    """Every lora.relora_interval steps of a stage with adapters: merge them into their bases,
    re-initialise them and clear (or prune) their Adam moments (``merge_adapters``)."""
    k = run.cfg.lora.relora_interval
    if k and run.step_in_stage % k == 0 and run.current_stage.adapter_resets:
        merge_adapters(run, run.optimizer, run.cfg.lora.reset_prune)


def adamw(cfg, groups: list[dict], fused: bool):
    """AdamW at the run's precision. fp32 states: torch.optim.AdamW. 8bit/4bit states: torchao's
    block-wise quantized AdamW8bit/AdamW4bit (bf16 stochastic rounding with bf16 weights). bf16
    states: torch-optimi's AdamW with Kahan summation. With bf16 master weights the trainable
    parameters are cast to bf16 in place first (their gradients follow)."""
    import torch

    from steplm.errors import UserError

    t, prec = cfg.train, precision(cfg)
    if prec.master_weights == "bf16":
        for g in groups:
            for p in g["params"]:
                p.data = p.data.to(torch.bfloat16)
                if p.grad is not None:
                    p.grad = p.grad.to(torch.bfloat16)
    kw = dict(lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)
    if prec.optimizer_states == "fp32":
        return torch.optim.AdamW(groups, fused=fused, **kw)
    if prec.optimizer_states == "bf16":
        try:
            import optimi
        except ImportError:
            raise UserError("train.optimizer_states: bf16 needs the optional extra: pip install 'steplm[lowbit]'")
        return optimi.AdamW(groups, kahan_sum=True, decouple_lr=False, **kw)
    try:
        from torchao.optim import AdamW4bit, AdamW8bit
    except ImportError:
        raise UserError(f"train.optimizer_states: {prec.optimizer_states} needs the optional extra: "
                        "pip install 'steplm[lowbit]'")
    cls = AdamW8bit if prec.optimizer_states == "8bit" else AdamW4bit
    # torchao compiles one step per parameter shape and dtype; a model has more than dynamo's default
    # 8 (embeddings, head, seven linears, norms, adapters), and fullgraph compile fails past the limit.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    return _trainer_friendly(cls)(groups, bf16_stochastic_round=prec.master_weights == "bf16", **kw)


def _trainer_friendly(cls):
    """``cls`` (a torchao low-bit AdamW) adapted to the trainer: the trainer sets a float lr, which
    torchao keeps as a 0-d tensor during ``step`` only; and under a torch dispatch mode (the CPU peak
    measurement's MemTracker), where torch.compile cannot trace, its per-parameter step runs eagerly."""
    import unittest.mock

    import torch
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode

    class TrainerFriendly(cls):
        def step(self, closure=None):
            for g in self.param_groups:
                g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float32)
            try:
                if is_in_torch_dispatch_mode(include_infra_modes=False):
                    with unittest.mock.patch.object(torch, "compile", lambda fn, **kw: fn):
                        return super().step(closure)
                return super().step(closure)
            finally:
                for g in self.param_groups:
                    g["lr"] = float(g["lr"])

    TrainerFriendly.__name__ = TrainerFriendly.__qualname__ = cls.__name__
    return TrainerFriendly


class Method:
    """A full-rank, single-stage method with AdamW; subclasses override what differs."""

    name = "vanilla"
    staged = False
    """Whether the LR schedule restarts every stage (STEP) rather than one cosine over the run."""

    # -- planning (pure) --------------------------------------------------------------------------
    def problems(self, cfg) -> list[str]:
        """Config problems specific to this method, each naming the key to change."""
        return []

    def init_problems(self, cfg, depth: int) -> list[str]:
        """Config problems of starting from model.init_from, a checkpoint of ``depth`` layers. A method
        that does not grow trains the checkpoint at its own depth."""
        if cfg.model.n_layers != depth:
            return [f"model.n_layers: method {self.name} trains model.init_from {cfg.model.init_from} at its "
                    f"depth ({depth}); set model.n_layers to {depth}, got {cfg.model.n_layers}"]
        return []

    def lora_rank(self, cfg) -> int:
        """Adapter rank r on frozen linears (0: no adapters)."""
        return 0

    def layers_per_stage(self, cfg) -> list[int]:
        """n_1..n_K, the layers each stage adds."""
        return [cfg.model.n_layers]

    def stage_counts(self, cfg, layers_per_stage: list[int]) -> list[dict]:
        """Non-embedding parameter counts of each stage: ``layers``, ``new_layers``, ``trainable``,
        ``frozen`` and ``lora`` (Eq. 2's terms; old layers are frozen and carry adapters)."""
        shape = layer_shape(cfg.model)
        P = memory.params_per_layer(shape)
        rank = self.lora_rank(cfg)
        E = memory.lora_params_per_layer(shape, rank) if rank else 0
        out, before = [], 0
        for n in layers_per_stage:
            out.append({"layers": before + n, "new_layers": n, "trainable": n * P + before * E,
                        "frozen": before * P, "lora": before * E})
            before += n
        return out

    def stage_steps(self, cfg, counts: list[dict]) -> list[int]:
        """Optimizer steps of each stage: vanilla's budget (FLOPs, or steps with
        step.budget_match=steps) split so that stages 1..K-1 grow at step.growth_fraction."""
        s = cfg.step
        if len(counts) == 1:
            return [cfg.train.max_steps]
        if s.budget_match == "steps":
            per, budget = [1.0] * len(counts), float(cfg.train.max_steps)
        else:
            per = [float(flops_per_token(cfg, c, s.flops_convention)) for c in counts]
            budget = float(flops_per_token(cfg, full_rank_counts(cfg), s.flops_convention)) * cfg.train.max_steps
        return flops_mod.split_budget(budget, per, s.growth_fraction)

    def layer_state_bytes(self, cfg, layers_per_stage: list[int], counts: list[dict]) -> list[int]:
        """Model-state bytes of the transformer layers in each stage (Eq. 2; Eq. 1 for one stage)."""
        g, k = memory.layer_costs(layer_shape(cfg.model), self.lora_rank(cfg), precision(cfg))
        return memory.stage_bytes_from_costs(layers_per_stage, g, k)

    def outer_state_bytes(self, cfg) -> int:
        """Model-state bytes of the embeddings, LM head and final norm, trainable in every stage."""
        m = cfg.model
        return memory.head_state_bytes(m.vocab_size, m.d_model, m.tie_embeddings, precision(cfg))

    def stage_kind(self, cfg, index: int, counts: dict) -> str:
        """'full' (every layer trainable), 'grown' (old layers frozen) or 'lora' (all linears adapted)."""
        return "full" if not counts["frozen"] else "grown"

    def restart_ramp_from(self, cfg, kind: str) -> int:
        """Step of a stage from which ReLoRA's restart ramp multiplies the LR."""
        return cfg.lora.relora_interval

    # -- training hooks (torch) ---------------------------------------------------------------------
    def enter_stage(self, run, stage) -> None:
        """A pass over ``run.model`` as ``stage`` begins (stage 0 right after the model is built)."""

    def build_optimizer(self, cfg, model, groups: list[dict], fused: bool):
        """AdamW over the trainable parameter groups (decay, no-decay) at train.optimizer_states and
        train.master_weights (``adamw``)."""
        return adamw(cfg, groups, fused)

    def after_optimizer_step(self, run) -> None:
        """Called after every counted optimizer step."""
