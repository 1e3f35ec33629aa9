"""Config dataclasses: YAML round trip, --set overrides, collected validation errors."""
import pytest

from steplm import config
from steplm.errors import UserError


def test_yaml_round_trip(tmp_path):
    cfg = config.load(None, ["train.lr=1e-3", "model.n_layers=7", "step.layers_per_stage=[3,4]",
                             "step.n_stages=2", "method=step", "data.path=123"])
    assert cfg.train.lr == 1e-3 and cfg.model.n_layers == 7 and cfg.step.layers_per_stage == [3, 4]
    assert cfg.data.path == "123"  # paths stay strings
    config.save(cfg, tmp_path / "c.yaml")
    assert config.load(tmp_path / "c.yaml").to_dict() == cfg.to_dict()


def test_unknown_key_is_named():
    with pytest.raises(UserError, match=r"unknown config key: train\.lrr"):
        config.load(None, ["train.lrr=1"])
    with pytest.raises(UserError, match="unknown config key: optim"):
        config.from_dict({"optim": {}})


def test_all_problems_reported_together():
    cfg = config.load(None, ["model.d_model=30", "model.n_heads=4", "train.seq_len=999", "step.position=middle",
                             "method=step", "step.n_stages=2", "step.layers_per_stage=[3,4]"])
    msg = "; ".join(config.problems(cfg))
    for key in ("model.d_model", "train.seq_len", "step.position", "step.layers_per_stage: must sum"):
        assert key in msg


@pytest.mark.parametrize("item,key", [
    ("lora.rank=999", "lora.rank"), ("step.growth_fraction=1.5", "step.growth_fraction"),
    ("step.growth_fraction=0", "step.growth_fraction"), ("method=sgd", "method"),
    ("train.max_steps=0", "train.max_steps"), ("model.n_layers=-2", "model.n_layers"),
])
def test_single_bad_value(item, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        config.validate(config.load(None, [item]))


def test_field_docs_exist_for_every_field():
    import dataclasses
    for cls in (config.TrainConfig, config.DataConfig, config.LoraConfig, config.StepConfig):
        docs = config.field_docs(cls)
        assert {f.name for f in dataclasses.fields(cls)} == set(docs)
