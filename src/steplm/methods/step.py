"""STEP (Yano et al. 2025): grow at each stage boundary, freeze the old layers in bf16 with ReLoRA
adapters, train the new layers and the adapters; the LR rewarms every stage (Eq. 2, Eq. 3)."""
from __future__ import annotations

from steplm.methods.base import Method, init_depth, layer_shape, merge_adapters, precision, relora_reset
from steplm.plan import solve


class Step(Method):
    name = "step"
    staged = True

    def problems(self, cfg) -> list[str]:
        s = cfg.step
        if isinstance(s.n_stages, int) and s.n_stages < 2:
            return [f"step.n_stages: method {self.name} needs at least 2 stages, got {s.n_stages}"]
        return []

    def init_problems(self, cfg, depth: int) -> list[str]:
        """From a pretrained model the first stage is the checkpoint: n_1 = its depth (config.problems
        has checked that model.n_layers is at least that)."""
        s, L, src = cfg.step, cfg.model.n_layers, cfg.model.init_from
        if s.layers_per_stage is not None:
            if s.layers_per_stage[0] != depth:
                return [f"step.layers_per_stage: must start with model.init_from {src}'s depth ({depth}), "
                        f"got {s.layers_per_stage}"]
        elif L - depth < s.n_stages - 1:
            return [f"step.n_stages: growing model.init_from {src}'s {depth} layers to model.n_layers ({L}) "
                    f"leaves room for at most {L - depth + 1} stages, got {s.n_stages}"]
        else:
            try:
                self.layers_per_stage(cfg)
            except ValueError as e:  # e.g. step.cap_growth cannot grow so few layers to L
                return [f"step.cap_growth: no split of model.n_layers ({L}) into {s.n_stages} stages starts "
                        f"with model.init_from {src}'s {depth} layers ({e})"]
        return []

    def lora_rank(self, cfg) -> int:
        return cfg.lora.rank

    def layers_per_stage(self, cfg) -> list[int]:
        """step.layers_per_stage, or the Eq. 3 optimum for the model's real layer shape (with n_1 fixed
        to the checkpoint's depth when stage 1 starts from model.init_from)."""
        s = cfg.step
        if s.layers_per_stage:
            return list(s.layers_per_stage)
        return solve.optimize(cfg.model.n_layers, s.n_stages, layer_shape(cfg.model), self.lora_rank(cfg),
                                s.cap_growth, precision(cfg), first=init_depth(cfg)).layers_per_stage

    def enter_stage(self, run, stage) -> None:
        """Merge earlier adapters, insert the new layers (step.init/position/fpi), then freeze every
        old layer that is not yet frozen and give it adapters of rank ``lora_rank``."""
        if stage.index == 0:
            return
        from steplm.passes.growth import grow
        from steplm.passes.lora import apply_lora, is_frozen_block

        cfg, s = run.cfg, run.cfg.step
        merge_adapters(run)  # earlier adapters fold into their bases
        is_new = grow(run.model, stage.new_layers, s.init, s.position, s.fpi, seed=cfg.train.seed + stage.index)
        for block, new in zip(run.model.model.layers, is_new):
            if not new and not is_frozen_block(block):
                apply_lora(block, self.lora_rank(cfg), cfg.lora.alpha, run.gen)

    def after_optimizer_step(self, run) -> None:
        relora_reset(run)


class StepNoPet(Step):
    """STEP without adapters: old layers are frozen and stay as they are (paper Table 5)."""
    name = "step-no-pet"

    def lora_rank(self, cfg) -> int:
        return 0
