"""APOLLO (Zhu et al. 2025, MLSys) through apollo-torch: full-rank weights, AdamW moments of the
gradient randomly projected to rank apollo.rank, used only to scale the raw gradient channel- or
tensor-wise (an SGD-like update with AdamW-level memory savings). A peer baseline to STEP."""
from __future__ import annotations

from steplm.methods.base import Method, layer_shape, split_projected
from steplm.plan import memory


class Apollo(Method):
    name = "apollo"

    def problems(self, cfg) -> list[str]:
        return _fp32_only(cfg, self.name)

    def layer_state_bytes(self, cfg, layers_per_stage: list[int], counts: list[dict]) -> list[int]:
        """Per block, for each m×n linear: fp32 weight and gradient 8·m·n, projected moments
        8·r·max(m, n) and the stored random projection 4·r·min(m, n); 16 B per norm weight."""
        per_layer = memory.apollo_layer_bytes(layer_shape(cfg.model), cfg.apollo.rank)
        return [c["layers"] * per_layer for c in counts]

    def build_optimizer(self, cfg, model, groups: list[dict], fused: bool):
        """apollo-torch's APOLLOAdamW: random projection for the layers' *_proj weights, plain AdamW
        for embeddings, head and norms."""
        from steplm.errors import UserError

        try:
            from apollo_torch import APOLLOAdamW
        except ImportError:
            raise UserError("method: apollo needs the optional extra: pip install 'steplm[apollo]'")
        t, a = cfg.train, cfg.apollo
        projected, rest = split_projected(model, groups)
        return APOLLOAdamW([
            {"params": projected, "weight_decay": t.weight_decay, "rank": a.rank, "proj": "random",
             "scale_type": a.scale_type, "scale": a.scale, "update_proj_gap": a.update_proj_gap, "proj_type": "std"},
            *rest,
        ], lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)


def _fp32_only(cfg, name: str) -> list[str]:
    """Projected-moment methods keep their own optimizer state: fp32 states and weights only."""
    t, out = cfg.train, []
    if t.optimizer_states != "fp32":
        out.append(f"train.optimizer_states: method {name} keeps its own projected fp32 moments; set fp32, "
                   f"got {t.optimizer_states!r}")
    if t.master_weights != "fp32":
        out.append(f"train.master_weights: method {name} trains fp32 weights; set fp32, got {t.master_weights!r}")
    return out
