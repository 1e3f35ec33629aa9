"""Damaged files a user hands steplm, the second bad-input table: run folders, HF folders, token caches,
tokenizer folders, checkpoint manifests, question files and plots. Every entry exits with code 2
and one line naming the file or flag, with no traceback and nothing written; a damaged checkpoint
is skipped, never loaded."""
import json
import math
import shutil

import pytest
from safetensors.torch import load_file, save_file

from steplm import config
from steplm.train import checkpoint
from steplm.cli import main
from steplm.errors import TrainingStopped
from steplm.data import shards

from conftest import ROOT, shared, tiny_overrides


def _weights(fn):
    def damage(d):
        w = load_file(str(d / "model.safetensors"))
        fn(w)
        save_file(w, str(d / "model.safetensors"))
    return damage


def _nan(w):
    next(v for k, v in sorted(w.items()) if k.endswith("q_proj.weight"))[0, 0] = float("nan")


def _inf(w):
    w[sorted(w)[0]][-1, -1] = float("inf")


def _drop(w):
    w.pop(sorted(k for k in w if "layers.1." in k)[0])


def _write(name, text):
    return lambda d: (d / name).write_text(text)


def _truncate(name, keep=0.5):
    return lambda d: (d / name).write_bytes((d / name).read_bytes()[: int((d / name).stat().st_size * keep)])


# (damage to a copy of a finished run, needle)
RUN_DAMAGE = {
    "model_config not JSON": (_write("model_config.json", "{bad"), "model_config.json is not readable JSON"),
    "model_config a list": (_write("model_config.json", "[]"), "must hold a JSON object"),
    "model_config bad value": (_write("model_config.json", json.dumps({"vocab_size": 512, "d_model": 32, "n_layers": -1,
                                                                        "n_heads": 2})), "model.n_layers"),
    "tokenizer missing": (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json does not exist"),
    "tokenizer not JSON": (_write("tokenizer.json", "{bad"), "not a readable tokenizer.json"),
    "tokenizer empty object": (_write("tokenizer.json", "{}"), "not a readable tokenizer.json"),
    "weights truncated": (_truncate("model.safetensors"), "not a readable safetensors file"),
    "weights garbage": (_write("model.safetensors", "x" * 4096), "not a readable safetensors file"),
    "weights NaN": (_weights(_nan), "non-finite weights"),
    "weights inf": (_weights(_inf), "non-finite weights"),
    "weights missing a tensor": (_weights(_drop), "does not match its model_config.json"),
    "model_config missing": (lambda d: (d / "model_config.json").unlink(), "steplm run without model_config.json"),
    "weights missing": (lambda d: (d / "model.safetensors").unlink(), "steplm run without model.safetensors"),
    # RoPE tables no machine holds (2·positions·head_dim fp32): one line, not an allocator traceback
    "max_seq_len 2e9": (lambda d: _edit_json(d / "model_config.json", max_seq_len=2_000_000_000),
                        "lower max_seq_len in"),
    "max_seq_len 1e15": (lambda d: _edit_json(d / "model_config.json", max_seq_len=10**15), "lower max_seq_len in"),
}


def _edit_json(path, **change):
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))


def _snapshot(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _refused(argv, capsys, needle, root):
    before = _snapshot(root)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err.replace(str(root), "<tmp>"), err  # in the message, not in pytest's test-named tmp path
    assert _snapshot(root) == before  # nothing half-written
    return err


@pytest.fixture
def damaged_run(tiny_run, tmp_path):
    def make(name):
        d = tmp_path / "run"
        shutil.copytree(tiny_run, d, ignore=shutil.ignore_patterns("checkpoints"))
        RUN_DAMAGE[name][0](d)
        return d
    return make


@pytest.mark.parametrize("name", list(RUN_DAMAGE))
@pytest.mark.parametrize("command", ["eval", "export", "generate"])
def test_a_damaged_run_folder_is_one_line(damaged_run, tmp_path, capsys, name, command):
    d = damaged_run(name)
    extra = {"eval": ["--data", str(shared("shakespeare/input.txt")), "--max-tokens", "256"],
             "export": ["--to", str(tmp_path / "hf")], "generate": ["--prompt", "hi", "--max-new-tokens", "2"]}
    _refused([command, str(d), *extra[command]], capsys, RUN_DAMAGE[name][1], tmp_path)


@pytest.mark.parametrize("name", [n for n in RUN_DAMAGE if n.startswith(("model_config", "tokenizer not"))])
def test_info_on_a_damaged_run_folder_is_one_line(damaged_run, tmp_path, capsys, name):
    _refused(["info", str(damaged_run(name))], capsys, RUN_DAMAGE[name][1], tmp_path)


@pytest.fixture(scope="module")
def hf_export(tiny_run, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "model"
    assert main(["export", str(tiny_run), "--to", str(d)]) == 0
    return d


def _hf_config(**change):
    def damage(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(change)
        (d / "config.json").write_text(json.dumps(cfg))
    return damage


HF_DAMAGE = {
    "config not JSON": (_write("config.json", "{bad"), "config.json is not readable JSON"),
    "config a list": (_write("config.json", "[1]"), "must hold a JSON object"),
    "tokenizer not JSON": (_write("tokenizer.json", "{bad"), "not a readable tokenizer.json"),
    "weights truncated": (_truncate("model.safetensors", 0.9), "not a readable safetensors file"),
    "weights NaN": (_weights(_nan), "non-finite weights"),
    "rope factor below 1": (_hf_config(rope_parameters={"rope_type": "linear", "factor": 0.5, "rope_theta": 1e4}),
                            "factor must be at least 1"),
    "rope factor zero": (_hf_config(rope_parameters={"rope_type": "yarn", "factor": 0, "rope_theta": 1e4,
                                                     "original_max_position_embeddings": 16}), "finite positive"),
    "max_position_embeddings 2e9": (_hf_config(max_position_embeddings=2_000_000_000), "max_position_embeddings"),
    "max_position_embeddings 1e13": (_hf_config(max_position_embeddings=10**13), "max_position_embeddings"),
    "weights missing": (lambda d: (d / "model.safetensors").unlink(), "no weights"),
}


def _shrink_vocab(d, vocab):
    """An HF folder whose config.json vocab_size (and embedding rows) is below its tokenizer's size."""
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "vocab_size": vocab}))
    w = load_file(str(d / "model.safetensors"))
    save_file({k: v[:vocab].contiguous() if "embed_tokens" in k or "lm_head" in k else v for k, v in w.items()},
              str(d / "model.safetensors"), metadata={"format": "pt"})


SMALL_VOCAB_COMMANDS = {
    "eval": lambda tmp: ["eval", "{d}", "--data", str(shared("shakespeare/input.txt")), "--max-tokens", "256"],
    "eval transformers": lambda tmp: ["eval", "{d}", "--backend", "transformers", "--data",
                                      str(shared("shakespeare/input.txt")), "--max-tokens", "256"],
    "eval tasks": lambda tmp: ["eval", "{d}", "--tasks", "piqa", "--limit", "4", "--tasks-dir", str(shared("eval"))],
    "generate": lambda tmp: ["generate", "{d}", "--prompt", "To be, or not to be", "--max-new-tokens", "2"],
    "sft": lambda tmp: ["sft", "{d}", "--data", str(shared("alpaca/seed_tasks.jsonl")), "--limit", "4", "--out",
                        str(tmp / "sft"), "--quiet"],
    "mt-bench": lambda tmp: ["mt-bench", "{d}", "--questions", str(shared("eval/mt_bench/question.jsonl")),
                             "--limit", "1", "--max-new-tokens", "2", "--out", str(tmp / "answers.jsonl")],
}


@pytest.mark.parametrize("vocab", [64, 200])
@pytest.mark.parametrize("command", list(SMALL_VOCAB_COMMANDS))
def test_a_tokenizer_beyond_the_model_vocabulary_is_one_line(hf_export, tmp_path, capsys, command, vocab):
    """Ids the tokenizer gives past the model's embedding rows: one line naming MODEL, where every
    command encodes text (before: an IndexError from the embedding lookup)."""
    d = tmp_path / "hf"
    shutil.copytree(hf_export, d)
    _shrink_vocab(d, vocab)
    argv = [a.replace("{d}", str(d)) for a in SMALL_VOCAB_COMMANDS[command](tmp_path)]
    err = _refused(argv, capsys, "MODEL: the tokenizer encodes", tmp_path)
    assert f"the model has {vocab} embeddings" in err


def test_a_small_vocabulary_model_still_runs_on_text_within_it(hf_export, tmp_path, capsys):
    """Refused only when an id is out of range: the same model scores text whose ids all fit."""
    from steplm.io.files import read_tokenizer

    d = tmp_path / "hf"
    shutil.copytree(hf_export, d)
    tok = read_tokenizer(d / "tokenizer.json", "MODEL")
    text = "the the the and the"
    vocab = max(tok.encode(text, add_special_tokens=False).ids + [tok.token_to_id("<|endoftext|>")]) + 1
    assert vocab < tok.get_vocab_size()
    _shrink_vocab(d, vocab)
    (tmp_path / "in.txt").write_text((text + "\n") * 100)
    assert main(["eval", str(d), "--data", str(tmp_path / "in.txt"), "--seq-len", "16"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("name", list(HF_DAMAGE))
def test_a_damaged_hf_folder_is_one_line_for_eval_and_init_from(hf_export, tmp_path, capsys, name):
    d = tmp_path / "hf"
    shutil.copytree(hf_export, d)
    HF_DAMAGE[name][0](d)
    _refused(["eval", str(d), "--data", str(shared("shakespeare/input.txt")), "--max-tokens", "256"], capsys,
             HF_DAMAGE[name][1], tmp_path)
    # the token cache (a reusable cache, complete when written) lives outside the snapshot
    err = _refused(["train", "--init-from", str(d), "--data", str(shared("shakespeare/input.txt")), "--out",
                    str(tmp_path / "o"), "--quiet", "--set", f"data.cache_dir={tmp_path.parent / 'cache'}"], capsys,
                   HF_DAMAGE[name][1], tmp_path)
    assert (str(d) in err or "init-from" in err or "init_from" in err) and "MODEL" not in err, err


@pytest.mark.parametrize("damage", ["hf weights missing", "run weights missing", "run weights and config.yaml missing",
                                    "run model_config missing", "run tokenizer missing", "run weights empty"])
def test_info_refuses_a_folder_no_command_can_load(tiny_run, hf_export, tmp_path, capsys, damage):
    """`info` describes only what eval/generate/export can load: a folder without weights, or a run
    without its final files, is one line naming what is missing, not a description and exit 0."""
    d = tmp_path / "m"
    shutil.copytree(hf_export if damage.startswith("hf") else tiny_run, d, ignore=shutil.ignore_patterns("checkpoints"))
    if damage == "run weights empty":
        (d / "model.safetensors").write_bytes(b"")
    for name in {"hf weights missing": ["model.safetensors"], "run weights missing": ["model.safetensors"],
                 "run weights and config.yaml missing": ["model.safetensors", "config.yaml"],
                 "run model_config missing": ["model_config.json"], "run tokenizer missing": ["tokenizer.json"],
                 "run weights empty": []}[damage]:
        (d / name).unlink()
    needle = {"run weights missing": "steplm run without", "run model_config missing": "steplm run without",
              "run tokenizer missing": "has no tokenizer.json", "run weights empty": "is empty (0 bytes)"}.get(
        damage, "no weights")
    _refused(["info", str(d)], capsys, needle, tmp_path)


def test_init_from_a_run_with_no_model_yet_names_the_flag(tiny_run, tmp_path, capsys):
    """A steplm run is a model for --init-from (test_run_dir.py); one with neither a final model nor a
    checkpoint is one line under --init-from's name."""
    d = tmp_path / "m"
    shutil.copytree(tiny_run, d)
    (d / "model.safetensors").unlink()
    shutil.rmtree(d / "checkpoints", ignore_errors=True)  # runs checkpoint by default: else it reads the newest
    err = _refused(["train", "--init-from", str(d), "--data", str(shared("shakespeare/input.txt")), "--out",
                    str(tmp_path / "o"), "--quiet"], capsys, "without an intact checkpoint", tmp_path)
    assert err.startswith(f"steplm: error: --init-from: {d} is a steplm run without model.safetensors"), err


# ---------------------------------------------------------------------------- token cache, tokenizers
@pytest.fixture(scope="module")
def cache_entry(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    cfg = config.load(None, tiny_overrides(tmp))
    out, _ = shards.prepare(cfg.data, tmp / "cache", progress=False)
    return out


CACHE_DAMAGE = {
    "train.bin truncated": _truncate("train.bin", 0.5),
    "val.bin grown": lambda d: (d / "val.bin").write_bytes((d / "val.bin").read_bytes() + b"\0\0\0"),
    "train.json not JSON": _write("train.json", "{bad"),
    "train.json a list": _write("train.json", "[]"),
    "val.json wrong dtype": _write("val.json", json.dumps({"dtype": "float64", "n_tokens": 1, "n_docs": 1})),
    "tokenizer.json not JSON": _write("tokenizer.json", "{bad"),
}


@pytest.mark.parametrize("name", list(CACHE_DAMAGE))
def test_a_damaged_token_cache_entry_names_the_folder_to_delete(cache_entry, tmp_path, capsys, name):
    root = tmp_path / "cache"
    shutil.copytree(cache_entry, root / cache_entry.name)
    CACHE_DAMAGE[name](root / cache_entry.name)
    sets = tiny_overrides(tmp_path, **{"data.cache_dir": str(root)})
    err = _refused(["train", "--out", str(tmp_path / "o"), "--quiet", *[x for s in sets for x in ("--set", s)]],
                   capsys, "data.cache_dir", tmp_path)
    assert cache_entry.name in err and "delete it" in err


def test_a_cache_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    sets = tiny_overrides(tmp_path, **{"data.cache_dir": str(tmp_path / "afile")})
    _refused(["train", "--out", str(tmp_path / "o"), "--quiet", *[x for s in sets for x in ("--set", s)]],
             capsys, "data.cache_dir", tmp_path)


TOKENIZER_DAMAGE = {
    "tokenizer.json not JSON": {"tokenizer.json": "{bad"},
    "tokenizer.json empty object": {"tokenizer.json": "{}"},
    "vocab.json not JSON": {"vocab.json": "{bad", "merges.txt": "#version: 0.2\n"},
    "merges.txt garbage": {"vocab.json": json.dumps({"a": 0, "b": 1}), "merges.txt": "a b c d\n"},
}


@pytest.mark.parametrize("name", list(TOKENIZER_DAMAGE))
def test_a_damaged_tokenizer_folder_is_one_line(tmp_path, capsys, name):
    tok = tmp_path / "tok"
    tok.mkdir()
    for f, text in TOKENIZER_DAMAGE[name].items():
        (tok / f).write_text(text)
    sets = tiny_overrides(tmp_path, **{"data.tokenizer": str(tok)})
    _refused(["train", "--out", str(tmp_path / "o"), "--quiet", *[x for s in sets for x in ("--set", s)]],
             capsys, "data.tokenizer", tmp_path)


# ---------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("manifest", ["[]", '{"sha256": [1]}', '{"sha256": {}}', '{"sha256": {"a.bin": 5}}',
                                      '{"sha256": {"../a.bin": "00"}}', "{bad", '{"sha256": null}'])
def test_a_damaged_manifest_makes_the_checkpoint_corrupt_not_a_crash(tmp_path, manifest):
    final = checkpoint.save(tmp_path, 10, {"a.bin": lambda p: p.write_bytes(b"abc"),
                                           "b.bin": lambda p: p.write_bytes(b"def")}, keep=2)
    assert checkpoint.verify(final) is None
    (final / checkpoint.MANIFEST).write_text(manifest)
    assert checkpoint.verify(final) is not None
    assert checkpoint.latest_valid(tmp_path, log=lambda m: None) is None


def test_a_file_missing_from_the_manifest_makes_the_checkpoint_corrupt(tmp_path):
    final = checkpoint.save(tmp_path, 10, {"a.bin": lambda p: p.write_bytes(b"abc")}, keep=2)
    (final / "trainer.pt").write_bytes(b"garbage, never loaded")
    assert "trainer.pt" in checkpoint.verify(final)


# ---------------------------------------------------------------------------- flags and small files
@pytest.mark.parametrize("argv,flag", [
    (["train", "--out", "", "--data", "x"], "--out"), (["train", "--out", "  ", "--data", "x"], "--out"),
    (["train", "--out", "o", "--data", ""], "--data"), (["train", "", "--out", "o"], "config"),
    (["export", "{run}", "--to", ""], "--to"), (["eval", "", "--data", "x"], "model"),
    (["mt-bench", "{run}", "--questions", "", "--out", "a.jsonl"], "--questions"),
    (["mt-bench", "{run}", "--questions", "q.jsonl", "--out", ""], "--out"),
    (["plot", "{run}", "--out", ""], "--out"), (["info", ""], "model"),
    (["sft", "{run}", "--data", "a.json", "--out", ""], "--out"),
])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(tiny_run, tmp_path, capsys, monkeypatch, argv, flag):
    monkeypatch.chdir(tmp_path)
    err = _refused([a.replace("{run}", str(tiny_run)) for a in argv], capsys, "expected a path", tmp_path)
    assert flag in err


def test_a_missing_tasks_dir_is_refused_not_replaced(tiny_run, tmp_path, capsys):
    _refused(["eval", str(tiny_run), "--tasks", "piqa", "--tasks-dir", str(tmp_path / "none")], capsys,
             "--tasks-dir", tmp_path)


def test_eval_seq_len_beyond_the_context_is_refused(tiny_run, tmp_path, capsys):
    _refused(["eval", str(tiny_run), "--data", str(shared("shakespeare/input.txt")), "--seq-len", "4096"], capsys,
             "--seq-len", tmp_path)


def test_export_into_a_non_empty_folder_is_refused(tiny_run, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    _refused(["export", str(tiny_run), "--to", str(tmp_path / "full")], capsys, "not empty", tmp_path)


@pytest.mark.parametrize("text,needle", [
    ("{bad\n", "line 1 is not JSON"), ("", "holds no questions"), ("\n\n", "holds no questions"),
    ("[1, 2]\n", "must be a JSON object"), ('{"question_id": 1, "turns": "hi"}\n', "list of turns"),
    ('{"question_id": 1, "turns": []}\n', "list of turns"), ('{"turns": ["hi"]}\n', "question_id"),
    # ids FastChat's judge could not match the answers by, and turns with nothing to answer
    ('{"question_id": 1, "turns": ["a"]}\n{"question_id": 1, "turns": ["b"]}\n', "line 2 of"),
    ('{"question_id": null, "turns": ["a"]}\n', "question_id None is not an integer or a name"),
    ('{"question_id": [1, 2], "turns": ["a"]}\n', "question_id [1, 2]"),
    ('{"question_id": true, "turns": ["a"]}\n', "question_id True"),
    ('{"question_id": " ", "turns": ["a"]}\n', "question_id ' '"),
    ('{"question_id": 1, "turns": ["a", ""]}\n', "line 1 of"),
    ('{"question_id": 1, "turns": ["a"]}\n{"question_id": 2, "turns": [" \\n"]}\n', "a turn is empty"),
])
def test_a_bad_question_file_is_one_line(tiny_run, tmp_path, capsys, text, needle):
    (tmp_path / "q.jsonl").write_text(text)
    _refused(["mt-bench", str(tiny_run), "--questions", str(tmp_path / "q.jsonl"), "--out",
              str(tmp_path / "a.jsonl")], capsys, needle, tmp_path)


def test_mt_bench_questions_a_folder_is_refused(tiny_run, tmp_path, capsys):
    _refused(["mt-bench", str(tiny_run), "--questions", str(tmp_path), "--out", str(tmp_path / "a.jsonl")], capsys,
             "is a directory; give its question.jsonl", tmp_path)


def test_mt_bench_out_a_folder_is_refused(tiny_run, tmp_path, capsys):
    (tmp_path / "q.jsonl").write_text('{"question_id": 1, "turns": ["hi"]}\n')
    _refused(["mt-bench", str(tiny_run), "--questions", str(tmp_path / "q.jsonl"), "--out", str(tmp_path)],
             capsys, "is a directory", tmp_path)


@pytest.mark.parametrize("summary,needle", [("{bad", "not readable JSON"), ("[]", "JSON object"),
                                            ('{"stages": []}', "per-stage"), ('{"stages": [{"stage": 0}]}', "lacks")])
def test_plot_of_a_damaged_summary_is_one_line(tiny_run, tmp_path, capsys, summary, needle):
    d = tmp_path / "run"
    shutil.copytree(tiny_run, d, ignore=shutil.ignore_patterns("checkpoints"))
    (d / "summary.json").write_text(summary)
    _refused(["plot", str(d)], capsys, needle, tmp_path)


def test_plot_out_under_a_file_is_refused_and_a_folder_gets_memory_png(tiny_run, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    _refused(["plot", str(tiny_run), "--out", str(tmp_path / "afile" / "x.png")], capsys, "--out", tmp_path)
    (tmp_path / "plots").mkdir()
    assert main(["plot", str(tiny_run), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "memory.png").is_file()


@pytest.mark.parametrize("yaml_text,key", [("model:\n  d_model: 32\nmodel:\n  d_model: 64\n", "'model'"),
                                           ("train:\n  lr: 1\n  lr: 2\n", "'lr'"),
                                           ("train: {lr: 1, lr: 2}\n", "'lr'")])
def test_a_key_given_twice_in_a_config_is_refused(tmp_path, capsys, yaml_text, key):
    (tmp_path / "c.yaml").write_text(yaml_text)
    err = _refused(["plan", str(tmp_path / "c.yaml")], capsys, "given twice", tmp_path)
    assert key in err


@pytest.mark.parametrize("spec,needle", [("bpe:abc", "integer N"), ("bpe:-5", "integer N"), ("bpe:10", "at least 300")])
def test_plan_refuses_a_bad_bpe_spec_as_train_does(tmp_path, capsys, spec, needle):
    _refused(["plan", str(ROOT / "configs" / "tiny.yaml"), "--set", f"data.tokenizer={spec}"], capsys, needle, tmp_path)


# ---------------------------------------------------------------------------- a diverged model
def test_a_non_finite_validation_loss_stops_the_run_and_writes_no_model(tmp_path, monkeypatch):
    """Finite weights whose logits overflow (a diverged run) give val loss nan: the run stops with
    TrainingStopped (exit 3), and no model.safetensors or summary.json is written as its result."""
    from steplm.train.loop import Trainer
    cfg = config.load(None, tiny_overrides(tmp_path, **{"train.max_steps": 4}))
    monkeypatch.setattr(Trainer, "evaluate", lambda self, *a, **k: float("nan"))
    with pytest.raises(TrainingStopped, match="validation loss is nan"):
        Trainer(cfg, tmp_path / "run", progress=False).fit()
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert not (tmp_path / "run" / "summary.json").exists()


# ---------------------------------------------------------------------------- review round: more of each kind
def test_a_stray_file_in_a_checkpoint_is_ignored_but_an_unlisted_loader_file_is_not(tmp_path):
    final = checkpoint.save(tmp_path, 10, {"model.safetensors": lambda p: p.write_bytes(b"w"),
                                           "trainer.pt": lambda p: p.write_bytes(b"t"),
                                           "config.yaml": lambda p: p.write_text("x: 1\n")}, keep=2)
    (final / ".DS_Store").write_bytes(b"finder")
    assert checkpoint.verify(final) is None
    m = json.loads((final / checkpoint.MANIFEST).read_text())
    del m["sha256"]["config.yaml"]
    (final / checkpoint.MANIFEST).write_text(json.dumps(m))
    assert "config.yaml" in checkpoint.verify(final)


@pytest.mark.parametrize("yaml_text,want", [
    ("base: &b {lr: 0.002}\ntrain:\n  <<: *b\n", 0.002),
    ("a: &a {lr: 0.003}\nb: &b {max_steps: 7}\ntrain:\n  <<: [*a, *b]\n", 0.003),
    ("train: &t\n  lr: 0.004\n", 0.004),
])
def test_yaml_merge_keys_and_anchors_still_load(tmp_path, yaml_text, want):
    import yaml
    (tmp_path / "c.yaml").write_text(yaml_text)
    from steplm.config.load import _UniqueKeyLoader
    d = yaml.load(yaml_text, Loader=_UniqueKeyLoader)
    assert d["train"]["lr"] == want


def test_a_complex_yaml_key_is_one_line_not_a_traceback(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("? [a, b]\n: 1\n")
    _refused(["plan", str(tmp_path / "c.yaml")], capsys, "config", tmp_path)


@pytest.mark.parametrize("summary", [b"\xff\xfe binary", b"[1, 2]", b"{bad"])
def test_export_and_info_leave_out_a_damaged_history(tiny_run, tmp_path, capsys, summary):
    d = tmp_path / "run"
    shutil.copytree(tiny_run, d, ignore=shutil.ignore_patterns("checkpoints"))
    (d / "summary.json").write_bytes(summary)
    assert main(["info", str(d)]) == 0
    assert main(["export", str(d), "--to", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()


@pytest.fixture(scope="module")
def sharded_export(tiny_run, tmp_path_factory):
    d = tmp_path_factory.mktemp("sharded") / "model"
    assert main(["export", str(tiny_run), "--to", str(d), "--max-shard-size", "20000"]) == 0
    assert (d / "model.safetensors.index.json").is_file()
    return d


@pytest.mark.parametrize("index,needle", [
    (b"\xff\xfe", "not readable JSON"), (b"[]", "JSON object"), (b'{"weight_map": {"a": 5}}', "as a shard"),
    (b'{"weight_map": {"a": "../model.safetensors"}}', "as a shard"), (b'{"weight_map": []}', "no weight_map"),
])
def test_a_damaged_shard_index_is_one_line(sharded_export, tmp_path, capsys, index, needle):
    d = tmp_path / "hf"
    shutil.copytree(sharded_export, d)
    (d / "model.safetensors.index.json").write_bytes(index)
    _refused(["eval", str(d), "--data", str(shared("shakespeare/input.txt")), "--max-tokens", "256"], capsys,
             needle, tmp_path)


def test_transformers_backend_on_truncated_weights_is_one_line(hf_export, tmp_path, capsys):
    pytest.importorskip("transformers")
    d = tmp_path / "hf"
    shutil.copytree(hf_export, d)
    _truncate("model.safetensors", 0.5)(d)
    _refused(["eval", str(d), "--backend", "transformers", "--data", str(shared("shakespeare/input.txt")),
              "--max-tokens", "256"], capsys, "MODEL", tmp_path)


def test_a_missing_tensor_is_named(damaged_run, tmp_path, capsys):
    err = _refused(["eval", str(damaged_run("weights missing a tensor")), "--data",
                    str(shared("shakespeare/input.txt"))], capsys, "Missing key", tmp_path)
    assert "layers.1." in err


def test_export_to_a_file_is_one_line(tiny_run, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    _refused(["export", str(tiny_run), "--to", str(tmp_path / "afile")], capsys, "--to", tmp_path)


@pytest.mark.parametrize("value", ["1" + "0" * 400, "-" + "1" + "0" * 400])
def test_a_huge_rope_number_is_one_line(tmp_path, capsys, value):
    _refused(["plan", str(ROOT / "configs" / "tiny.yaml"), "--set",
              f"model.rope_scaling={{rope_type: linear, factor: {value}}}"], capsys, "model.rope_scaling", tmp_path)


@pytest.mark.parametrize("name", ["x.txt", "plots.v2", "fig.PDF"])
def test_plot_refuses_a_non_png_name(tiny_run, tmp_path, capsys, name):
    _refused(["plot", str(tiny_run), "--out", str(tmp_path / name)], capsys, ".png", tmp_path)


TASK_DAMAGE = {
    "piqa labels missing": ("piqa", lambda d: (d / "piqa" / "valid-labels.lst").unlink(), "valid-labels.lst"),
    "piqa label not a number": ("piqa", lambda d: (d / "piqa" / "valid-labels.lst").write_text("x\n"), "piqa"),
    "arc not JSON": ("arc_easy", lambda d: (d / "arc_easy" / "ARC-Easy-Test.jsonl").write_text("{bad\n"), "not JSON"),
    "winogrande field missing": ("winogrande", lambda d: (d / "winogrande" / "dev.jsonl").write_text(
        json.dumps({"sentence": "a _ b"}) + "\n"), "winogrande"),
    "hellaswag not bz2": ("hellaswag", lambda d: (d / "hellaswag" / "hellaswag_val_full.txt.bz2").write_bytes(
        b"plain"), "hellaswag"),
    # files that parse but do not mean what they would be scored as: refused, not dropped or scored as a miss
    "piqa a label short": ("piqa", lambda d: _edit_lines(d / "piqa" / "valid-labels.lst", lambda ls: ls[:-1]),
                           "1837 labels for the 1838 items"),
    "piqa a label extra": ("piqa", lambda d: _edit_lines(d / "piqa" / "valid-labels.lst", lambda ls: ls + ["0"]),
                           "1839 labels for the 1838 items"),
    "piqa label 2": ("piqa", lambda d: _edit_lines(d / "piqa" / "valid-labels.lst", lambda ls: ["2"] + ls[1:]),
                     "item 1: the answer '2' is not one of its 2 choices"),
    "arc answer not a label": ("arc_easy", lambda d: _edit_jsonl_row(d / "arc_easy" / "ARC-Easy-Test.jsonl", 2,
                                                                answerKey="Z"), "item 3: the answer 'Z'"),
    "openbookqa answer not a label": ("openbookqa", lambda d: _edit_jsonl_row(d / "openbookqa" / "test.jsonl", 0,
                                                                         answerKey="E"), "item 1: the answer 'E'"),
    "winogrande answer 3": ("winogrande", lambda d: _edit_jsonl_row(d / "winogrande" / "dev.jsonl", 1, answer="3"),
                            "item 2: the answer '3' is not one of its 2 choices"),
    "winogrande no blank": ("winogrande", lambda d: _edit_jsonl_row(d / "winogrande" / "dev.jsonl", 0, sentence="a b"),
                            "no '_' blank"),
    "hellaswag gold 4": ("hellaswag", lambda d: _edit_bz2_lines(d / "hellaswag" / "hellaswag_val_full.txt.bz2",
                                                                lambda ls: ls[:1] + ["4"] + ls[2:]),
                         "item 1: the answer '4' is not one of its 4 choices"),
    "hellaswag last item short": ("hellaswag", lambda d: _edit_bz2_lines(
        d / "hellaswag" / "hellaswag_val_full.txt.bz2", lambda ls: ls[:-1]), "not a multiple of 6"),
    "piqa empty": ("piqa", lambda d: [(d / "piqa" / f).write_text("") for f in ("valid.jsonl", "valid-labels.lst")],
                   "holds no items"),
    "arc empty": ("arc_challenge", lambda d: (d / "arc_challenge" / "ARC-Challenge-Test.jsonl").write_text("\n"),
                  "holds no items"),
    "lambada empty": ("lambada", lambda d: (d / "lambada" / "lambada_test.jsonl").write_text(""), "holds no items"),
    # items that parse but leave nothing to score, or would be scored as something else
    "arc empty choice": ("arc_easy", lambda d: _edit_question(d / "arc_easy" / "ARC-Easy-Test.jsonl", 0,
                                                              lambda q: q["choices"][1].update(text="")),
                         "item 1: 'text' is empty"),
    "arc single choice": ("arc_challenge", lambda d: _edit_question(
        d / "arc_challenge" / "ARC-Challenge-Test.jsonl", 1, lambda q: q.update(choices=q["choices"][:1])),
        "item 2: 1 choice(s)"),
    "arc labels repeat": ("arc_easy", lambda d: _edit_question(d / "arc_easy" / "ARC-Easy-Test.jsonl", 0, lambda q: [
        c.update(label="A") for c in q["choices"]]), "item 1: the choice labels"),
    "openbookqa stem a list": ("openbookqa", lambda d: _edit_question(d / "openbookqa" / "test.jsonl", 3,
                                                                      lambda q: q.update(stem=["Q"])),
                               "item 4: 'stem' is not text (list)"),
    "piqa goal null": ("piqa", lambda d: _edit_jsonl_row(d / "piqa" / "valid.jsonl", 0, goal=None),
                       "item 1: 'goal' is not text (NoneType)"),
    "piqa empty solution": ("piqa", lambda d: _edit_jsonl_row(d / "piqa" / "valid.jsonl", 1, sol2="  "),
                            "item 2: 'sol2' is empty"),
    "hellaswag blank ending": ("hellaswag", lambda d: _edit_bz2_lines(
        d / "hellaswag" / "hellaswag_val_full.txt.bz2", lambda ls: ls[:3] + [""] + ls[4:]), "item 1: 'ending' is empty"),
    "lambada trailing space": ("lambada", lambda d: _edit_jsonl_row(d / "lambada" / "lambada_test.jsonl", 0,
                                                                    text="hello world "), "item 1: the text ends"),
    "lambada empty text": ("lambada", lambda d: _edit_jsonl_row(d / "lambada" / "lambada_test.jsonl", 2, text=""),
                           "item 3: the text ends"),
    "winogrande nothing after the blank": ("winogrande", lambda d: _edit_jsonl_row(
        d / "winogrande" / "dev.jsonl", 0, sentence="The _"), "item 1: nothing follows"),
    "winogrande answer 0": ("winogrande", lambda d: _edit_jsonl_row(d / "winogrande" / "dev.jsonl", 0,
                                                                    answer="0"), "the answer '0'"),
}


def _edit_question(path, row, change):
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    change(rows[row]["question"])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _edit_lines(path, change):
    path.write_text("\n".join(change(path.read_text().split("\n")[:-1])) + "\n")


def _edit_jsonl_row(path, row, **fields):
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows[row].update(fields)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _edit_bz2_lines(path, change):
    import bz2
    lines = bz2.decompress(path.read_bytes()).decode().split("\n")[:-1]
    path.write_bytes(bz2.compress(("\n".join(change(lines)) + "\n").encode()))


@pytest.mark.parametrize("name", list(TASK_DAMAGE))
def test_a_damaged_task_file_is_one_line(tiny_run, tmp_path, capsys, name):
    task, damage, needle = TASK_DAMAGE[name]
    d = tmp_path / "eval"
    shutil.copytree(shared("eval") / task, d / task)
    damage(d)
    _refused(["eval", str(tiny_run), "--tasks", task, "--tasks-dir", str(d), "--limit", "4"], capsys, needle,
             tmp_path)


@pytest.mark.parametrize("content,needle", [(b"\xff\xfe[1]", "UTF-8"),
                                            (b'[{"instruction": "x", "instances": [1, 2]}]', "instances")])
def test_a_damaged_sft_file_is_one_line(tiny_run, tmp_path, capsys, content, needle):
    (tmp_path / "d.json").write_bytes(content)
    _refused(["sft", str(tiny_run), "--data", str(tmp_path / "d.json"), "--out", str(tmp_path / "o")], capsys,
             needle, tmp_path)


def test_a_finite_model_whose_perplexity_overflows_reports_inf(damaged_run, tiny_run, tmp_path, capsys):
    """A head scaled by 1e4 gives finite logits whose mean loss is past exp's range (~709 nats):
    eval and the LAMBADA score report ppl inf (the string "inf" in JSON), not an OverflowError."""
    d = tmp_path / "hot"
    shutil.copytree(tiny_run, d, ignore=shutil.ignore_patterns("checkpoints"))

    def heat(w):
        w["lm_head.weight" if "lm_head.weight" in w else "model.embed_tokens.weight"] *= 1e4
    _weights(heat)(d)
    assert main(["eval", str(d), "--data", str(shared("shakespeare/input.txt")), "--max-tokens", "256",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["loss"] > 709 and res["ppl"] == "inf", res
    assert main(["eval", str(d), "--tasks", "lambada", "--tasks-dir", str(shared("eval")), "--limit", "5",
                 "--json"]) == 0
    lam = json.loads(capsys.readouterr().out)["tasks"]["lambada"]
    assert lam["ppl"] == "inf", lam
    from steplm.eval.loss import perplexity_of
    assert math.isnan(perplexity_of(float("nan"))) and perplexity_of(800.0) == math.inf


@pytest.mark.parametrize("summary,needle", [("{bad", "is not a readable JSON object"),
                                            ('["a list"]', "is not a readable JSON object"),
                                            ('{"method": "vanilla", "layers_per_stage": "abc"}',
                                             "holds a layers_per_stage of the wrong kind ('abc')")])
def test_a_damaged_summary_is_left_out_of_the_history_and_said_so(tiny_run, tmp_path, capsys, summary, needle):
    """info and export still work on a run whose summary.json is damaged (the model is whole), but the
    history they print or write leaves the damaged record out and one warning line says so."""
    d = tmp_path / "run"
    shutil.copytree(tiny_run, d, ignore=shutil.ignore_patterns("checkpoints"))
    (d / "summary.json").write_text(summary)
    assert main(["info", str(d), "--json"]) == 0
    history = json.loads(capsys.readouterr().out)["steplm"]
    assert "layers_per_stage" not in history
    assert main(["export", str(d), "--to", str(tmp_path / "hf")]) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and needle in warnings[0], warnings
    assert "layers_per_stage" not in json.loads((tmp_path / "hf" / "config.json").read_text())["steplm"]
