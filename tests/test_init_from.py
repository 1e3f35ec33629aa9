"""STEP from a pretrained model (model.init_from / --init-from): the imported model, its growth, a short
run and the export all agree with transformers; the planner fixes n_1 to the checkpoint's depth and its
bytes match the live tensors for a block with biases and head_dim != d/heads; bad input is one line.

The checkpoint is a tiny random ``LlamaForCausalLM`` saved with ``save_pretrained``; expected logits and
parameter counts come from transformers, never from steplm."""
import itertools
import json

import pytest
import torch
import yaml

from steplm import config
from steplm.errors import UserError
from steplm.methods.base import layer_shape
from steplm.plan import memory
from steplm.plan import solve

from conftest import shared
from test_hf import hf_logits, ids, make_hf_dir, run_cli

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: E402

# head_dim 24 != 64/4, GQA, biases everywhere: every way the real block differs from the paper's.
ARCH = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, attention_bias=True, mlp_bias=True, max_position_embeddings=64)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pretrained")
    make_hf_dir(d, seed=3, **ARCH)
    return d


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "train.txt"
    p.write_text(shared("shakespeare/input.txt").read_text()[:60_000])
    return p


def sets(tmp, text, **extra):
    base = {"method": "step", "data.path": str(text), "data.val_fraction": 0.2, "data.cache_dir": str(tmp / "cache"),
            "model.n_layers": 4, "step.n_stages": 2, "step.fpi": "true", "train.seq_len": 32, "train.micro_batch": 4,
            "train.max_steps": 24, "train.warmup_steps": 2, "train.lr": 3e-3, "train.eval_every": 0,
            "train.eval_tokens": 2048, "train.log_every": 1, "train.dtype": "fp32", "lora.rank": 4}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def hf_layer_counts(path, rank):
    """(P, E): parameters of one block and its LoRA adapters r·(in+out), counted on transformers' model."""
    hf = LlamaForCausalLM.from_pretrained(str(path))
    block = hf.model.layers[0]
    P = sum(p.numel() for p in block.parameters())
    E = sum(rank * (m.in_features + m.out_features) for m in block.modules() if isinstance(m, torch.nn.Linear))
    return P, E


def bf16_layers_logits(path, x):
    """transformers' logits with every decoder-layer tensor rounded to bf16 (how STEP stores frozen layers)."""
    hf = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in hf.model.layers.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        return hf(input_ids=x).logits


# ---------------------------------------------------------------------------- config
def test_architecture_and_tokenizer_come_from_the_directory(hf_dir, text, tmp_path):
    cfg = config.load(None, sets(tmp_path, text), init_from=str(hf_dir))
    config.validate(cfg)
    hf = json.loads((hf_dir / "config.json").read_text())
    m = cfg.model
    assert (m.d_model, m.ffn_hidden, m.n_heads, m.n_kv_heads, m.head_dim, m.vocab_size, m.max_seq_len) == \
        (hf["hidden_size"], hf["intermediate_size"], hf["num_attention_heads"], hf["num_key_value_heads"],
         hf["head_dim"], hf["vocab_size"], hf["max_position_embeddings"])
    assert (m.attention_bias, m.mlp_bias, m.n_layers, m.init_from) == (True, True, 4, str(hf_dir))
    assert cfg.data.tokenizer == str(hf_dir)
    # without model.n_layers the final depth is the checkpoint's (a plain continuation)
    plain = config.load(None, [s for s in sets(tmp_path, text, method="vanilla") if not s.startswith("model.")],
                        init_from=str(hf_dir))
    assert plain.model.n_layers == hf["num_hidden_layers"]


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 4.0},
                                  {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32},
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}])
def test_a_rope_scaled_checkpoint_configures_a_run(rope, text, tmp_path):
    """The imported rope_scaling passes the typed config (it once raised TypeError there) and the run's
    saved config.yaml, reloaded as on resume, keeps it."""
    make_hf_dir(tmp_path / "hf", rope_parameters={**rope, "rope_theta": 1e4})
    cfg = config.load(None, sets(tmp_path, text, **{"model.n_layers": 3}), init_from=str(tmp_path / "hf"))
    config.validate(cfg)
    assert cfg.model.rope_scaling == rope
    config.save(cfg, tmp_path / "config.yaml")
    assert config.load(tmp_path / "config.yaml").model.rope_scaling == rope


def test_the_planner_fixes_n1_to_the_checkpoint_depth(hf_dir, text, tmp_path):
    from steplm.plan.stages import plan_run
    cfg = config.load(None, sets(tmp_path, text, **{"model.n_layers": 7, "step.n_stages": 3}), init_from=str(hf_dir))
    config.validate(cfg)
    plan = plan_run(cfg)
    P, E = hf_layer_counts(hf_dir, cfg.lora.rank)
    assert memory.params_per_layer(layer_shape(cfg.model)) == P
    assert memory.lora_params_per_layer(layer_shape(cfg.model), cfg.lora.rank) == E
    best = min((max(memory.stage_bytes([2, *rest], P, E)), [2, *rest])
               for rest in itertools.product(range(1, 6), repeat=2) if 2 + sum(rest) == 7)
    assert plan.layers_per_stage[0] == 2
    assert max(memory.stage_bytes(plan.layers_per_stage, P, E)) == best[0]


def test_exact_solver_with_n1_fixed_matches_brute_force():
    P, E = memory.params_per_layer(memory.LayerShape(64, 96, 32, 96, True, True)), 7936
    for L, K, first, cap in itertools.product(range(3, 11), range(2, 5), range(1, 6), (False, True)):
        if K > L or first > L - K + 1:
            continue
        splits = [[first, *c] for c in itertools.product(range(1, L), repeat=K - 1) if first + sum(c) == L]
        if cap:
            splits = [s for s in splits if all(s[i] <= sum(s[:i]) for i in range(1, K))]
        if not splits:
            with pytest.raises(ValueError):
                solve.solve_exact(L, K, P, E, cap, first=first)
            continue
        peak = min(max(memory.stage_bytes(s, P, E)) for s in splits)
        sol = solve.solve_exact(L, K, P, E, cap, first=first)
        assert sol.peak == peak and sol.latest[0] == first
        assert sol.ties == sorted(s for s in splits if max(memory.stage_bytes(s, P, E)) == peak)
        milp = solve.solve_milp(L, K, P, E, cap, first=first, time_limit=None)
        assert milp[0] == first and max(memory.stage_bytes(milp, P, E)) == peak


@pytest.mark.parametrize("extra, needle", [
    ({"model.d_model": 256}, "model.d_model: 256 conflicts with --init-from {d} (hidden_size 64)"),
    ({"model.head_dim": 16}, "model.head_dim: 16 conflicts with --init-from {d} (head_dim 24)"),
    ({"data.tokenizer": "bpe:300"}, "data.tokenizer: 'bpe:300' conflicts with --init-from {d}"),
    ({"model.n_layers": 1}, "model.n_layers: the final depth must be at least model.init_from {d}'s (2), got 1"),
    ({"step.layers_per_stage": "[1,3]"}, "step.layers_per_stage: must start with model.init_from {d}'s depth (2)"),
    ({"step.n_stages": 4}, "step.n_stages: growing model.init_from {d}'s 2 layers to model.n_layers (4) leaves "
                           "room for at most 3 stages, got 4"),
    ({"method": "vanilla"}, "model.n_layers: method vanilla trains model.init_from {d} at its depth (2); "
                            "set model.n_layers to 2, got 4"),
])
def test_bad_config_is_one_line_naming_both(hf_dir, text, tmp_path, extra, needle):
    with pytest.raises(UserError) as e:
        config.validate(config.load(None, sets(tmp_path, text, **extra), init_from=str(hf_dir)))
    assert needle.format(d=hf_dir) in str(e.value)


def test_cli_refusal_exit_2_writes_nothing(hf_dir, text, tmp_path):
    out = tmp_path / "run"
    args = [x for s in sets(tmp_path, text, **{"model.d_model": 256}) for x in ("--set", s)]
    r = run_cli("train", *args, "--init-from", str(hf_dir), "--out", str(out))
    assert r.returncode == 2, r.stderr
    assert f"model.d_model: 256 conflicts with --init-from {hf_dir} (hidden_size 64)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
    r = run_cli("train", *args[:-2], "--init-from", str(tmp_path / "absent"), "--out", str(out))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--init-from" in r.stderr
    assert not out.exists()


def not_models(tmp_path) -> dict:
    """Folders that hold no model to start from, each with what its message must say."""
    run = tmp_path / "run"  # a run that stopped before its first checkpoint
    run.mkdir()
    (run / "config.yaml").write_text("method: vanilla\n")
    damaged = tmp_path / "ckpt" / "checkpoints" / "step_00000004"  # a manifest that checksums nothing
    damaged.mkdir(parents=True)
    (damaged / "MANIFEST.json").write_text("{}")
    (tmp_path / "file").write_text("x")
    return {tmp_path / "absent": "does not exist", tmp_path / "file": "is not a directory",
            run: "is a steplm run without", damaged: "is a damaged checkpoint",
            damaged.parent: "holds no intact checkpoint"}


def test_init_from_a_folder_without_a_model_says_what_is_wrong_in_one_line(tmp_path):
    """A run, its checkpoints folder or one checkpoint is a model to start from (tests/test_run_dir.py);
    a folder that holds none gets one line naming --init-from, the folder and what it lacks."""
    for d, needle in not_models(tmp_path).items():
        with pytest.raises(UserError) as e:
            config.load(None, [], init_from=str(d))
        line = str(e.value)
        assert line.startswith(f"--init-from: {d} {needle}") and "\n" not in line, line
    r = run_cli("plan", "--init-from", str(tmp_path / "run"))
    assert r.returncode == 2 and r.stderr.startswith(f"steplm: error: --init-from: {tmp_path / 'run'} is a steplm run")
    assert len(r.stderr.strip().splitlines()) == 1


def recipe(tmp_path, text, **model):
    """A config file with a training recipe and an architecture of its own (as configs/*.yaml have)."""
    f = tmp_path / "recipe.yaml"
    arch = {"vocab_size": 4096, "d_model": 128, "n_heads": 4, "n_layers": 4, "max_seq_len": 32, **model}
    f.write_text(yaml.safe_dump({"method": "step", "model": arch, "data": {"tokenizer": "bpe:4096", "path": str(text)},
                                 "train": {"seq_len": 32, "micro_batch": 4, "max_steps": 24, "warmup_steps": 2},
                                 "step": {"n_stages": 2}, "lora": {"rank": 4}}))
    return f


def test_a_config_files_architecture_gives_way_to_init_from(hf_dir, text, tmp_path):
    """`plan CONFIG --init-from DIR` (and train, which reads the same flags the same way): the command
    line beats the file, so the checkpoint's architecture and tokenizer replace the file's, said in
    one warning naming each replaced key; the file's final depth and recipe stay."""
    f = recipe(tmp_path, text)
    r = run_cli("plan", str(f), "--init-from", str(hf_dir), "--json")
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == (
        f"steplm: warning: --init-from {hf_dir} fixes the architecture and the tokenizer: the config file's "
        "model.vocab_size 4096, model.d_model 128, model.max_seq_len 32, data.tokenizer 'bpe:4096' give way to its "
        f"vocab_size {json.loads((hf_dir / 'config.json').read_text())['vocab_size']}, hidden_size 64, "
        "max_position_embeddings 64")
    plan = json.loads(r.stdout)
    assert plan["layers_per_stage"][0] == 2 and sum(plan["layers_per_stage"]) == 4  # n_1: the checkpoint's depth
    cfg = config.load(f, [], init_from=str(hf_dir))
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.data.tokenizer, cfg.train.max_steps) == (64, 4, str(hf_dir), 24)


@pytest.mark.parametrize("flags, needle", [
    (["--model.d_model", "256"], "--model.d_model: 256 conflicts with --init-from {d} (hidden_size 64); drop it "
                                 "(the checkpoint's config.json fixes the architecture)"),
    (["--set", "model.d_model=256"], "model.d_model: 256 conflicts with --init-from {d} (hidden_size 64); drop it "
                                     "(the checkpoint's config.json fixes the architecture)"),
    (["--data.tokenizer", "gpt2"], "--data.tokenizer: 'gpt2' conflicts with --init-from {d} (its tokenizer is used "
                                   "as-is); drop it or set it to that directory"),
])
def test_a_key_given_on_the_command_line_that_conflicts_says_drop_it(hf_dir, text, tmp_path, flags, needle):
    train = ["train", "--out", str(tmp_path / "out")]
    for command in (["plan"], train) if flags[0] == "--model.d_model" else (["plan"],):  # train reads them alike
        r = run_cli(*command, str(recipe(tmp_path, text)), "--init-from", str(hf_dir), *flags)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().splitlines()[-1] == "steplm: error: " + needle.format(d=hf_dir)
        assert not (tmp_path / "out").exists()


def test_init_from_in_the_file_beside_its_architecture_says_remove_it(hf_dir, text, tmp_path):
    """model.init_from and a conflicting model key in one file: neither beats the other, so the key
    is to be removed from the file (or set on the command line, where --init-from would win)."""
    f = recipe(tmp_path, text)
    d = yaml.safe_load(f.read_text())
    d["model"]["init_from"] = str(hf_dir)
    f.write_text(yaml.safe_dump(d))
    with pytest.raises(UserError) as e:
        config.load(f)
    assert str(e.value).startswith(f"model.vocab_size: 4096 conflicts with model.init_from {hf_dir} (vocab_size ")
    assert (f"model.d_model: 128 conflicts with model.init_from {hf_dir} (hidden_size 64); remove it from the "
            "config file (the checkpoint's config.json fixes the architecture)") in str(e.value)
    assert "data.tokenizer: 'bpe:4096' conflicts with model.init_from" in str(e.value)


# ---------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def run(hf_dir, text, tmp_path_factory):
    """A STEP run from the checkpoint: 2 -> 4 layers with FPI; logits checked before the first step and after growth."""
    from steplm.train.loop import Trainer
    tmp = tmp_path_factory.mktemp("init_run")
    cfg = config.load(None, sets(tmp, text), init_from=str(hf_dir))
    tr = Trainer(cfg, tmp / "run", progress=False)
    x = ids(cfg.model.vocab_size, T=32)
    with torch.no_grad():
        before = tr.model.eval()(x)
    val_before = tr.evaluate()
    tr_grown = Trainer(cfg, tmp / "grown", progress=False)  # a second trainer, grown without training
    tr_grown.next_stage()
    with torch.no_grad():
        grown = tr_grown.model.eval()(x)
    grown_layers = len(tr_grown.model.model.layers)
    tr_grown.lock.release()
    summary = tr.fit()
    return dict(out=tmp / "run", x=x, before=before, grown=grown, grown_layers=grown_layers,
                val_before=val_before, summary=summary, cfg=cfg)


def test_imported_logits_equal_transformers(run, hf_dir):
    assert (run["before"] - hf_logits(hf_dir, run["x"])).abs().max().item() <= 2e-5


def test_fpi_growth_keeps_the_function(run, hf_dir):
    """Grown to 4 layers, the frozen old layers held in bf16: transformers' model with those layers in bf16."""
    assert run["grown_layers"] == 4
    expected = bf16_layers_logits(hf_dir, run["x"])
    assert (run["grown"] - expected).abs().max().item() <= 2e-5
    assert (run["grown"] - hf_logits(hf_dir, run["x"])).abs().max().item() > 0  # bf16 rounding is visible


def test_short_run_lowers_the_loss(run):
    s = run["summary"]
    assert s["layers_per_stage"] == [2, 2]
    assert s["stages"][-1]["val_loss"] < run["val_before"] - 0.1


def test_measured_state_bytes_equal_planned_for_the_real_block(run, hf_dir):
    P, E = hf_layer_counts(hf_dir, run["cfg"].lora.rank)
    expected = memory.stage_bytes([2, 2], P, E)  # Eq. 2 on transformers' own counts
    for stage, layers in zip(run["summary"]["stages"], expected):
        assert stage["planned_state_bytes"]["layers"] == stage["measured_state_bytes"]["layers"] == layers
        assert stage["planned_state_bytes"]["total"] == stage["measured_state_bytes"]["total"]


def test_export_loads_in_transformers_with_parity(run, tmp_path):
    from steplm.io.run_dir import load_run
    r = run_cli("export", str(run["out"]), "--to", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert hf.config.num_hidden_layers == 4 and hf.config.head_dim == 24 and hf.config.attention_bias
    model, _ = load_run(run["out"])
    with torch.no_grad():
        assert (model(run["x"]) - hf(input_ids=run["x"]).logits).abs().max().item() <= 2e-5


def test_plan_cli_takes_init_from(hf_dir):
    r = run_cli("plan", "--init-from", str(hf_dir), "--set", "method=step", "--set", "model.n_layers=7",
                "--set", "step.n_stages=3", "--set", "lora.rank=4", "--set", "train.seq_len=32", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["layers_per_stage"][0] == 2 and sum(plan["layers_per_stage"]) == 7


def test_a_tokenizer_without_endoftext_is_refused(text, tmp_path):
    from steplm.train.loop import Trainer
    d = tmp_path / "llama_tok"
    make_hf_dir(d, llama_tok=True, **ARCH)
    cfg = config.load(None, sets(tmp_path, text), init_from=str(d))
    with pytest.raises(UserError, match=r"^model.init_from: .*'s tokenizer, with the <\|endoftext\|> token .* "
                                        r"has \d+ tokens, more than its model's vocabulary \(\d+\)"):
        Trainer(cfg, tmp_path / "run", progress=False)
