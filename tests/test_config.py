"""Config dataclasses: YAML round trip, --set overrides, collected validation errors, defaults that
follow the shape."""
import re
from pathlib import Path

import pytest
import yaml

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


@pytest.mark.parametrize("item,message", [
    ("step.layers_per_stage=3,x", "step.layers_per_stage[1]: must be an integer, got 'x'"),
    ("step.layers_per_stage=3,,5", "step.layers_per_stage[1]: expected an integer, got an empty value"),
    ("step.layers_per_stage=3,", "step.layers_per_stage[1]: expected an integer, got an empty value"),
    ("step.layers_per_stage=3.5,2", "step.layers_per_stage[0]: must be an integer"),
    ("step.layers_per_stage=true", "step.layers_per_stage[0]: must be an integer"),
    ("data.exclude=a,,b", "data.exclude[1]: expected a non-empty string, got an empty value"),
    # forms YAML 1.1 reads as integers but plan --layers-per-stage (and a reader) does not
    ("step.layers_per_stage=+4,2", "step.layers_per_stage[0]: must be an integer, got '+4'"),
    ("step.layers_per_stage=4,2_0", "step.layers_per_stage[1]: must be an integer, got '2_0'"),
    ("step.layers_per_stage=0x4,2", "step.layers_per_stage[0]: must be an integer, got '0x4'"),
    ("step.layers_per_stage=4:2", "step.layers_per_stage[0]: must be an integer, got '4:2'"),
])
def test_a_plain_list_with_a_bad_entry_names_the_entry(item, message):
    with pytest.raises(UserError, match=re.escape(message)):
        config.load(None, [item])


def test_field_docs_exist_for_every_field():
    import dataclasses
    for cls in (config.TrainConfig, config.DataConfig, config.LoraConfig, config.StepConfig):
        docs = config.field_docs(cls)
        assert {f.name for f in dataclasses.fields(cls)} == set(docs)


def test_configs_built_in_code_are_type_checked_too():
    import dataclasses
    cfg = config.RunConfig()
    cfg.train = dataclasses.replace(cfg.train, lr="fast", compile=1, beta1=float("nan"))
    cfg.step = dataclasses.replace(cfg.step, layers_per_stage=[2, "x"])
    msg = "; ".join(config.problems(cfg))
    for key in ("train.lr", "train.compile", "train.beta1: must be a finite", "step.layers_per_stage[1]"):
        assert key in msg, msg


@pytest.mark.parametrize("item,value", [
    ("train.lr=1e-3", 1e-3), ("train.lr=2", 2.0), ("train.lr=1E+2", 100.0), ("train.lr=.5", 0.5),
    ("data.max_train_tokens=null", None), ("data.max_train_tokens=1000", 1000), ("train.compile=true", True),
    ("step.layers_per_stage=[3, 5]", [3, 5]), ("data.exclude=[a, b]", ["a", "b"]),
    # the command line's plain lists, as plan --layers-per-stage 14,10 takes them
    ("step.layers_per_stage=3,5", [3, 5]), ("step.layers_per_stage= 3 , 5 ", [3, 5]), ("step.layers_per_stage=6", [6]),
    ("step.layers_per_stage=10,8,6", [10, 8, 6]), ("step.layers_per_stage=null", None),
    ("data.exclude=a,b", ["a", "b"]), ("data.exclude=tests", ["tests"]), ("data.exclude=[]", []),
    # items stripped as in YAML's [a, b] (" docs" would skip no folder); YAML's null unsets a path key
    ("data.exclude=tests, docs", ["tests", "docs"]), ("data.val_path=null", None), ("data.val_path=~", None),
    ("model.init_from=null", None), ("data.val_path=./null", "./null"),
])
def test_well_typed_values_are_accepted(item, value):
    key = item.split("=", 1)[0]
    section, name = key.split(".")
    got = getattr(getattr(config.load(None, [item]), section), name)
    assert got == value and type(got) is type(value)


def test_yaml_1_1_exponent_strings_are_numbers(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1e-3\n  weight_decay: 0\n")  # YAML 1.1: "1e-3" is a string, 0 an int
    cfg = config.load(p)
    assert cfg.train.lr == 1e-3 and cfg.train.weight_decay == 0.0 and type(cfg.train.weight_decay) is float


# RoPE scaling is a mapping field: accepted from --set and YAML (transformers' own rope functions then
# build the frequencies), its contents checked; the expected frequencies come from transformers.
ROPE_OK = [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "linear", "factor": 4},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64, "beta_fast": 16, "beta_slow": 2,
     "mscale": 1.5, "attention_factor": 0.9, "truncate": False},
    {"rope_type": "dynamic", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
]


@pytest.mark.parametrize("scaling", ROPE_OK)
def test_rope_scaling_mapping_is_accepted_from_set_and_yaml(scaling, tmp_path):
    import yaml
    flow = "{" + ", ".join(f"{k}: {v}" for k, v in scaling.items()) + "}"
    from_set = config.load(None, [f"model.rope_scaling={flow}"])
    config.validate(from_set)
    assert from_set.model.rope_scaling == scaling
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"model": {"rope_scaling": scaling}}))
    assert config.load(p).model.rope_scaling == scaling
    config.save(from_set, tmp_path / "saved.yaml")  # a run's config.yaml reloads (resume)
    assert config.load(tmp_path / "saved.yaml").model.rope_scaling == scaling


@pytest.mark.parametrize("item,needle", [
    ("model.rope_scaling=abc", "must be a mapping"),
    ("model.rope_scaling=[1, 2]", "must be a mapping"),
    ("model.rope_scaling=3", "must be a mapping"),
    ("model.rope_scaling={rope_type: linear}", "needs a number for factor"),
    ("model.rope_scaling={rope_type: linear, factor: -2}", "finite positive"),
    ("model.rope_scaling={rope_type: linear, factor: .nan}", "finite positive"),
    ("model.rope_scaling={rope_type: linear, factor: 0.5}", "at least 1"),
    ("model.rope_scaling={rope_type: yarn, factor: 0, original_max_position_embeddings: 64}", "finite positive"),
    ("model.rope_scaling={rope_type: yarn, factor: 2, original_max_position_embeddings: -1}", "finite positive"),
    ("model.rope_scaling={rope_type: linear, factor: true}", "needs a number for factor"),
    ("model.rope_scaling={rope_type: longrope, factor: 2}", "rope_type must be one of"),
    ("model.rope_scaling={rope_type: dynamic}", "needs a number for factor"),
    ("model.rope_scaling={rope_type: yarn, factor: 2, original_max_position_embeddings: 64, beta_fast: '32'}",
     "yarn's beta_fast must be a finite number"),
    ("model.rope_scaling={rope_type: yarn, factor: 2, original_max_position_embeddings: 64, truncate: 0}",
     "yarn's truncate must be true or false"),
    ("model.rope_scaling={rope_type: llama3, factor: 8, low_freq_factor: 4, high_freq_factor: 1, "
     "original_max_position_embeddings: 32}", "below its high_freq_factor"),
])
def test_bad_rope_scaling_is_one_named_problem(item, needle):
    with pytest.raises(UserError, match="model.rope_scaling") as e:
        config.validate(config.load(None, [item]))
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("scaling", ROPE_OK)
def test_scaled_rope_frequencies_from_a_set_are_transformers(scaling):
    transformers = pytest.importorskip("transformers")
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from steplm.model.llama import rope_inv_freq
    flow = "{" + ", ".join(f"{k}: {v}" for k, v in scaling.items()) + "}"
    cfg = config.load(None, [f"model.rope_scaling={flow}", "model.d_model=64", "model.n_heads=2"]).model
    hf = transformers.LlamaConfig(hidden_size=64, num_attention_heads=2, max_position_embeddings=cfg.max_seq_len,
                                  rope_parameters={**scaling, "rope_theta": cfg.rope_theta})
    want, want_scale = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf, torch.device("cpu"))
    got, scale = rope_inv_freq(cfg, torch.device("cpu"))
    assert torch.allclose(got.float(), want.float()) and scale == want_scale


# ---------------------------------------------------------------------------- ranks that follow the shape
ROOT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("preset,d_model", [("tiny.yaml", 128), ("tiny-step.yaml", 128), ("paper-368m.yaml", 1600),
                                            ("paper-1.2b.yaml", 2048)])
@pytest.mark.parametrize("method,default", [("apollo", 256), ("galore", 16)])
def test_an_unset_projection_rank_follows_the_shape(preset, d_model, method, default):
    """galore.rank / apollo.rank left unset take min(their default, d_model / 2): the run validates
    on every preset (apollo's 256 refused the tiny configs' d 128), and a preset's own rank stays."""
    cfg = config.load(ROOT_CONFIGS / preset, [f"method={method}"])
    config.validate(cfg)
    assert cfg.model.d_model == d_model
    given = (yaml.safe_load((ROOT_CONFIGS / preset).read_text()).get(method) or {}).get("rank")  # the preset's own
    assert getattr(cfg, method).rank == (given or min(default, d_model // 2))
    assert given in (None, 128)


@pytest.mark.parametrize("d_model,n_heads,galore,apollo", [(2, 1, 1, 1), (16, 2, 8, 8), (32, 2, 16, 16),
                                                           (96, 3, 16, 48), (512, 8, 16, 256), (4096, 32, 16, 256)])
def test_shape_ranks_at_the_edges(d_model, n_heads, galore, apollo):
    cfg = config.load(None, [f"model.d_model={d_model}", f"model.n_heads={n_heads}"])
    assert (cfg.galore.rank, cfg.apollo.rank) == (galore, apollo)


@pytest.mark.parametrize("method", ["apollo", "galore"])
def test_an_explicit_rank_is_kept_and_validated_as_given(method, tmp_path):
    ok = config.load(ROOT_CONFIGS / "tiny.yaml", [f"method={method}", f"{method}.rank=128"])
    config.validate(ok)  # the full rank d_model is allowed
    assert getattr(ok, method).rank == 128
    with pytest.raises(UserError, match=rf"^{method}\.rank: must be at most model\.d_model \(128\), got 129$"):
        config.validate(config.load(ROOT_CONFIGS / "tiny.yaml", [f"method={method}", f"{method}.rank=129"]))
    # the resolved config round-trips as an explicit value: a run's config.yaml reloads to the same dict
    auto = config.load(ROOT_CONFIGS / "tiny.yaml", [f"method={method}"])
    config.save(auto, tmp_path / "c.yaml")
    assert config.load(tmp_path / "c.yaml").to_dict() == auto.to_dict()


def test_the_rank_follows_the_shape_of_init_from(tmp_path):
    """The shape a rank follows is the final one: after --init-from has set model.d_model."""
    pytest.importorskip("transformers")
    from test_hf import make_hf_dir
    make_hf_dir(tmp_path / "hf", seed=0, hidden_size=24, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    cfg = config.load(None, ["method=apollo"], init_from=str(tmp_path / "hf"))
    assert (cfg.model.d_model, cfg.apollo.rank, cfg.galore.rank) == (24, 12, 12)


@pytest.mark.parametrize("method,old,refused", [
    ("vanilla", "apollo.rank=256", False), ("step", "apollo.rank=256", False), ("galore", "apollo.rank=256", False),
    ("apollo", "apollo.rank=100", True), ("galore", "galore.rank=8", True), ("vanilla", "lora.rank=4", True),
])
def test_a_resume_ignores_a_changed_default_the_run_does_not_read(tmp_path, method, old, refused):
    """A run folder whose config.yaml was written under the old defaults (apollo.rank 256; the tiny
    shape now resolves it to 64) resumes under the new ones, unless the run reads the key."""
    import types

    from steplm.train.saving import check_resume_config
    preset = ROOT_CONFIGS / "tiny.yaml"
    config.save(config.load(preset, [f"method={method}", old]), tmp_path / "config.yaml")
    run = types.SimpleNamespace(out=tmp_path, cfg=config.load(preset, [f"method={method}"]))
    assert run.cfg.apollo.rank == 64
    if refused:
        with pytest.raises(UserError, match=rf"holds a run with a different config \({old.split('=')[0]}\)"):
            check_resume_config(run)
    else:
        check_resume_config(run)


@pytest.mark.parametrize("method", ["apollo", "galore"])
def test_plan_takes_a_projected_method_on_the_tiny_config(capsys, method):
    """`steplm plan configs/tiny.yaml --set method=apollo` once failed on the default rank (256 > d 128)."""
    from steplm.cli.main import main
    assert main(["plan", str(ROOT_CONFIGS / "tiny.yaml"), "--set", f"method={method}", "--json"]) == 0, \
        capsys.readouterr().err
    import json
    assert json.loads(capsys.readouterr().out)["method"] == method


@pytest.mark.parametrize("flag, key, value", [
    ("--micro-batch", "train.micro_batch", "4"),
    ("--seq-len", "train.seq_len", "32"),
    ("--vocab-size", "model.vocab_size", "8192"),
    ("--micro-batch", "train.micro_batch", "1"),
])
def test_plan_config_takes_the_step_flags_as_their_config_keys(capsys, flag, key, value):
    """`plan CONFIG --micro-batch 4` plans what `train CONFIG --micro-batch 4` trains: the same plan as
    --set of the key (it was refused as 'not used with a CONFIG'), a second value of the same key is
    refused as train refuses it, and the same value twice is a warning."""
    import json

    from steplm.cli.main import main
    tiny = str(ROOT_CONFIGS / "tiny-step.yaml")
    assert main(["plan", tiny, "--set", f"{key}={value}", "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    assert main(["plan", tiny, flag, value, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == expected
    assert main(["plan", tiny, "--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert (default == expected) == (value == "1" and key == "train.micro_batch" and
                                     config.load(tiny).train.micro_batch == 1)
    assert main(["plan", tiny, flag, value, "--set", f"{key}={int(value) + 1}"]) == 2
    assert f"{flag}: also given as --set {key}; give one of them" in capsys.readouterr().err
    assert main(["plan", tiny, flag, value, f"--{key}", value, "--json"]) == 0
    assert "with the same value; give it once" in capsys.readouterr().err


def test_plan_config_json_says_what_data_train_would_read(capsys):
    """`plan CONFIG --json` carries the data line the table prints (null without data.path), and a
    missing data path is refused in both forms, as train refuses it."""
    import json

    from conftest import shared
    from steplm.cli.main import main
    tiny, text = str(ROOT_CONFIGS / "tiny-step.yaml"), str(shared("shakespeare/input.txt"))
    assert main(["plan", tiny, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["data"] is None
    assert main(["plan", tiny, "--data", text, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["data"]
    assert main(["plan", tiny, "--data", text]) == 0
    assert f"data: {data}" in capsys.readouterr().out.splitlines()
    assert text in data and "validation" in data
    for form in ([], ["--json"]):
        assert main(["plan", tiny, "--data", text + ".missing", *form]) == 2
        assert "--data" in capsys.readouterr().err


def test_a_run_saved_with_an_empty_string_still_resumes_and_plots(tmp_path):
    # a run started before `val_path: ""` was refused saved it as '' (read then as unset): its folder's
    # config.yaml is the run's, not the user's, so a resume (with the key now null) compares it as unset
    from types import SimpleNamespace

    from steplm.train.saving import check_resume_config

    cfg = config.load(None, ["data.path=corpus.txt", "data.exclude=[tests]"])
    config.save(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "val_path: null" in text and "- tests" in text
    (tmp_path / "config.yaml").write_text(text.replace("val_path: null", "val_path: ''")
                                          .replace("- tests", "- tests\n  - ''"))
    saved = config.load_saved(tmp_path / "config.yaml")
    assert saved.data.val_path is None and saved.data.exclude == ["tests"]
    assert config.differing_keys(saved, cfg) == []
    check_resume_config(SimpleNamespace(out=tmp_path, cfg=cfg))  # no UserError
    with pytest.raises(UserError, match="data.val_path: expected a non-empty string"):  # a user's file: refused
        config.load(tmp_path / "config.yaml")
