"""GaLore (Zhao et al. 2024) through galore-torch: full-rank weights, Adam moments of the gradient
projected to rank galore.rank for the attention and MLP weights."""
from __future__ import annotations

from steplm.methods.base import Method, layer_shape, split_projected
from steplm.plan import memory


class GaLore(Method):
    name = "galore"

    def problems(self, cfg) -> list[str]:
        from steplm.methods.apollo import _fp32_only
        return _fp32_only(cfg, self.name)

    def layer_state_bytes(self, cfg, layers_per_stage: list[int], counts: list[dict]) -> list[int]:
        """Per block 8·m·n + 8·r·max(m, n) + 4·r·min(m, n) for each m×n linear, 16 B per norm weight."""
        per_layer = memory.galore_layer_bytes(layer_shape(cfg.model), cfg.galore.rank)
        return [c["layers"] * per_layer for c in counts]

    def build_optimizer(self, cfg, model, groups: list[dict], fused: bool):
        """galore-torch's GaLoreAdamW: projected moments for the layers' *_proj weights, plain AdamW
        for embeddings, head and norms."""
        from steplm.errors import UserError

        try:
            from galore_torch import GaLoreAdamW
        except ImportError:
            raise UserError("method: galore needs the optional extra: pip install 'steplm[galore]'")
        t, g = cfg.train, cfg.galore
        projected, rest = split_projected(model, groups)
        return GaLoreAdamW([
            {"params": projected, "weight_decay": t.weight_decay, "rank": g.rank,
             "update_proj_gap": g.update_proj_gap, "scale": g.scale, "proj_type": g.proj_type},
            *rest,
        ], lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, no_deprecation_warning=True)  # its own warning: noise
