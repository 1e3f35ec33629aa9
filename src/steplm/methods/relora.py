"""ReLoRA (Lialin et al. 2023): a full-rank warm start, then LoRA on every attention and MLP linear
(norms, embeddings and head stay trainable), merged and re-initialised every lora.relora_interval
steps under a jagged cosine. The LoRA phase gets the rest of vanilla's FLOPs (or steps)."""
from __future__ import annotations

from steplm.methods.base import Method, flops_per_token, full_rank_counts, layer_shape, precision, relora_reset
from steplm.plan import memory


def warm_steps(cfg) -> int:
    """Steps of the full-rank warm start: lora.warm_start_fraction of train.max_steps."""
    return round(cfg.train.max_steps * cfg.lora.warm_start_fraction)


class ReLoRA(Method):
    name = "relora"

    def problems(self, cfg) -> list[str]:
        if not cfg.lora.relora_interval:
            return ["lora.relora_interval: method relora needs a positive reset interval (steps)"]
        return []

    def lora_rank(self, cfg) -> int:
        return cfg.lora.rank

    def _lora_counts(self, cfg) -> dict:
        shape = layer_shape(cfg.model)
        P, E = memory.params_per_layer(shape), memory.lora_params_per_layer(shape, cfg.lora.rank)
        L, norms = cfg.model.n_layers, 2 * cfg.model.d_model
        return {"layers": L, "new_layers": 0, "trainable": L * (norms + E), "frozen": L * (P - norms), "lora": L * E}

    def stage_counts(self, cfg, layers_per_stage: list[int]) -> list[dict]:
        """The full-rank warm start (skipped when it has 0 steps), then the LoRA phase."""
        lora = self._lora_counts(cfg)
        return [full_rank_counts(cfg), lora] if warm_steps(cfg) else [lora]

    def stage_steps(self, cfg, counts: list[dict]) -> list[int]:
        """The warm start costs what vanilla does; the cheaper LoRA phase gets the rest of vanilla's
        FLOPs (step.budget_match flops) or of its steps (budget_match steps)."""
        warm, s = warm_steps(cfg), cfg.step
        if s.budget_match == "steps":
            rest = cfg.train.max_steps - warm
        else:
            full = flops_per_token(cfg, full_rank_counts(cfg), s.flops_convention)
            lora = flops_per_token(cfg, self._lora_counts(cfg), s.flops_convention)
            rest = max(1, round((cfg.train.max_steps - warm) * full / lora))
        return [warm, rest] if warm else [rest]

    def layer_state_bytes(self, cfg, layers_per_stage: list[int], counts: list[dict]) -> list[int]:
        """Warm start: Eq. 1. LoRA phase: linears frozen in bf16, norms and adapters at 16 B."""
        shape, prec = layer_shape(cfg.model), precision(cfg)
        L = cfg.model.n_layers
        return [L * (memory.relora_layer_bytes(shape, cfg.lora.rank, prec) if c["lora"]
                     else memory.trainable_layer_bytes(shape, prec)) for c in counts]

    def stage_kind(self, cfg, index: int, counts: dict) -> str:
        return "lora" if counts["lora"] else "full"

    def restart_ramp_from(self, cfg, kind: str) -> int:
        return 0  # the LR ramps after the switch to LoRA too, not only after resets

    def enter_stage(self, run, stage) -> None:
        """At the LoRA phase: adapters on every attention and MLP linear; norms stay trainable."""
        if stage.kind != "lora":
            return
        from steplm.passes.lora import apply_lora

        for block in run.model.model.layers:
            apply_lora(block, run.cfg.lora.rank, run.cfg.lora.alpha, run.gen, freeze_norms=False)

    def after_optimizer_step(self, run) -> None:
        relora_reset(run)
