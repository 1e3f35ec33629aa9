"""The paper presets carry Table 6 and Table 7 of Yano et al. (2025) as written there."""
import pytest

from conftest import ROOT
from steplm.config import load

# Table 7: peak lr and batch size in tokens (K = 1000) for vanilla / STEP; Table 6: warmup, seq.
TABLE7 = {"paper-368m": (5e-4, 360_000), "paper-680m": (4e-4, 688_000), "paper-1.2b": (3e-4, 1_179_000),
          "paper-1.2b-3stage": (3e-4, 1_179_000)}


@pytest.mark.parametrize("name", sorted(TABLE7))
def test_preset_matches_tables_6_and_7(name):
    cfg = load(ROOT / "configs" / f"{name}.yaml")
    lr, batch_tokens = TABLE7[name]
    t = cfg.train
    assert t.lr == lr and t.warmup_steps == 1000 and t.seq_len == 1024 and t.max_steps == 20_000
    assert (t.beta1, t.beta2, t.weight_decay) == (0.9, 0.95, 0.1)
    tokens = t.micro_batch * t.grad_accum * t.seq_len
    assert abs(tokens - batch_tokens) <= t.micro_batch * t.seq_len / 2  # nearest whole micro-batch
    assert cfg.lora.rank == 128 and cfg.lora.relora_warmup == 500 and cfg.lora.relora_interval == 5000  # PET is ReLoRA
    assert (cfg.galore.rank, cfg.galore.update_proj_gap, cfg.galore.scale) == (128, 200, 0.25)
    assert cfg.step.n_stages == (3 if name.endswith("3stage") else 2)
    assert "assumed" not in (ROOT / "configs" / f"{name}.yaml").read_text()
