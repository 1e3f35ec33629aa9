"""Every checkpoint is a model: io/run_dir.py's one rule for a model folder (a finished run, a checkpoint
folder, RUN/checkpoints, a run without a final model), read-only, through every command that reads one."""
import hashlib
import json
import shutil

import pytest
import torch

from steplm.cli import main
from steplm.io.run_dir import load_model_dir, resolve_source
from steplm.train.checkpoint import list_steps, step_dir
from steplm.train.guards import RunLock

from conftest import shared


def folder_hash(root):
    """Every entry's path, and every file's bytes and mode, under ``root``."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode() + oct(p.stat().st_mode).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def unfinished(step_run, tmp_path):
    """A copy of the STEP run as it was before its last checkpoint and its final model: an interrupted
    run (or one still training). Its newest checkpoint is the one before the last."""
    d = tmp_path / "unfinished"
    shutil.copytree(step_run, d)
    for name in ("model.safetensors", "model_config.json", "summary.json"):
        (d / name).unlink()
    shutil.rmtree(step_dir(d / "checkpoints", list_steps(d / "checkpoints")[-1]))
    return d


def weights(model):
    return {k: v for k, v in model.state_dict().items()}


def test_the_last_checkpoint_reads_as_the_final_model(step_run):
    """A checkpoint holds frozen bf16 bases with fp32 adapters; read as a model, its adapters are merged
    exactly as the run merges them into its final model: the same tensors, bit for bit."""
    from safetensors import safe_open

    steps = list_steps(step_run / "checkpoints")
    summary = json.loads((step_run / "summary.json").read_text())
    assert steps[-1] == sum(summary["stage_steps"])  # the run checkpoints its last step
    last = step_dir(step_run / "checkpoints", steps[-1])
    with safe_open(str(last / "model.safetensors"), "pt") as f:
        assert any(k.endswith("lora_A") for k in f.keys())  # there is something to merge
    final, ckpt = load_model_dir(step_run), load_model_dir(last)
    assert ckpt.config == final.config and ckpt.config.n_layers == 4
    a, b = weights(final.model), weights(ckpt.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_stage_one_has_stage_one_depth(step_run):
    first = load_model_dir(step_dir(step_run / "checkpoints", 4))
    assert first.config.n_layers == 2
    assert "model.layers.2.mlp.up_proj.weight" not in first.model.state_dict()


def test_which_checkpoint_each_folder_means(step_run, unfinished, capsys):
    steps = list_steps(unfinished / "checkpoints")
    newest = step_dir(unfinished / "checkpoints", steps[-1])
    cases = {step_run: ("run", step_run), step_run / "checkpoints": ("checkpoint", step_dir(
        step_run / "checkpoints", list_steps(step_run / "checkpoints")[-1])), unfinished: ("checkpoint", newest),
        unfinished / "checkpoints": ("checkpoint", newest),
        step_dir(unfinished / "checkpoints", steps[0]): ("checkpoint", step_dir(unfinished / "checkpoints", steps[0]))}
    for given, (kind, where) in cases.items():
        src = resolve_source(given)
        assert (src.kind, src.weights_dir) == (kind, where), given
        run = step_run if given.is_relative_to(step_run) else unfinished
        assert src.run_dir == run
        # the run's tokenizer, one path for all its checkpoints; each carries a copy for when it is alone
        assert src.tokenizer_dir == run
        assert (where / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()
    old = step_dir(unfinished / "checkpoints", steps[0])  # as written before checkpoints carried it
    (old / "tokenizer.json").unlink()
    manifest = json.loads((old / "MANIFEST.json").read_text())
    del manifest["sha256"]["tokenizer.json"]
    (old / "MANIFEST.json").write_text(json.dumps(manifest))
    assert resolve_source(old).tokenizer_dir == unfinished
    alone = shutil.copytree(step_dir(unfinished / "checkpoints", steps[-1]), unfinished.parent / "alone" / "ckpt")
    assert resolve_source(alone).run_dir is None and resolve_source(alone).tokenizer_dir == alone
    assert capsys.readouterr().err == ""  # resolving says nothing; loading says which checkpoint


def test_a_damaged_newest_checkpoint_is_skipped_with_a_line(unfinished, capsys):
    steps = list_steps(unfinished / "checkpoints")
    newest = step_dir(unfinished / "checkpoints", steps[-1])
    (newest / "model.safetensors").write_bytes((newest / "model.safetensors").read_bytes()[:100])
    src = resolve_source(unfinished)
    assert src.weights_dir == step_dir(unfinished / "checkpoints", steps[-2]) and src.step == steps[-2]
    assert f"checkpoint {newest.name} is corrupt (model.safetensors fails its checksum)" in capsys.readouterr().err
    assert main(["info", str(newest)]) == 2  # named directly, a damaged checkpoint is refused in one line
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a damaged checkpoint (model.safetensors fails its checksum)" in err
    assert str(unfinished / "checkpoints") in err


@pytest.mark.parametrize("with_checkpoints_folder", [False, True])
def test_a_run_with_no_final_model_and_no_checkpoint_is_one_line(unfinished, capsys, with_checkpoints_folder):
    shutil.rmtree(unfinished / "checkpoints")
    if with_checkpoints_folder:
        (unfinished / "checkpoints").mkdir()  # a run that has not reached its first checkpoint yet
    for cmd in (["info", str(unfinished)], ["generate", str(unfinished), "--prompt", "To be"],
                ["export", str(unfinished), "--to", str(unfinished.parent / "hf")]):
        assert main(cmd) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert (f"{unfinished} is a steplm run without model.safetensors or model_config.json (its final model) "
                f"and without an intact checkpoint") in err, err
    assert not (unfinished.parent / "hf").exists()


def _command(name, model, tmp_path):
    """The argv of ``name`` reading ``model``, and what its success leaves to check."""
    data = str(shared("shakespeare/input.txt"))
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Name a colour.", "input": "", "output": "Blue."}] * 4))
    return {
        "eval": ["eval", model, "--data", data, "--max-tokens", "512", "--json"],
        "generate": ["generate", model, "--prompt", "To be", "--max-new-tokens", "4"],
        "export": ["export", model, "--to", str(tmp_path / "hf")],
        "info": ["info", model, "--json"],
        "train --init-from": ["train", "--init-from", model, "--data", data, "--out", str(tmp_path / "grown"),
                              "--max-steps", "2", "--quiet", "--set", f"data.cache_dir={tmp_path / 'cache'}",
                              "--set", "train.seq_len=32", "--set", "train.eval_tokens=256", "--set",
                              "train.warmup_steps=0"],
        "sft": ["sft", model, "--data", str(alpaca), "--out", str(tmp_path / "tuned"), "--epochs", "1",
                "--batch-size", "2", "--warmup-steps", "0", "--quiet"],
    }[name]


@pytest.mark.parametrize("where", ["checkpoint", "checkpoints", "unfinished", "copied"])
@pytest.mark.parametrize("name", ["eval", "generate", "export", "info", "train --init-from", "sft"])
def test_every_command_reads_a_checkpoint_read_only(unfinished, tmp_path, capsys, name, where):
    """Each command that reads a model takes a checkpoint folder, RUN/checkpoints and a run without
    its final model (held by a live run's lock), and a checkpoint folder copied out of its run (it
    carries its tokenizer), says which checkpoint it read, and changes nothing in the run folder: no
    file, no lock."""
    steps = list_steps(unfinished / "checkpoints")
    step = steps[0] if where == "checkpoint" else steps[-1]
    ckpt = step_dir(unfinished / "checkpoints", step)
    if where == "copied":  # alone, with no run around it
        ckpt = shutil.copytree(ckpt, tmp_path / "elsewhere" / ckpt.name)
    model = {"checkpoint": ckpt, "checkpoints": unfinished / "checkpoints", "unfinished": unfinished,
             "copied": ckpt}[where]
    before = folder_hash(unfinished)
    lock = RunLock(unfinished)  # a run still training holds its folder
    try:
        assert main(_command(name, str(model), tmp_path)) == 0
        with pytest.raises(Exception, match="in use by another steplm train"):
            RunLock(unfinished)  # still ours: the command neither took nor broke it
    finally:
        lock.release()
    assert folder_hash(unfinished) == before
    out, err = capsys.readouterr()
    if name == "info":
        d = json.loads(out)
        assert d["kind"] == "steplm checkpoint" and d["checkpoint"] == {"path": str(ckpt), "step": step}
        assert d["steplm"]["method"] == "step" and d["model"]["n_layers"] == (2 if step <= 8 else 4)
        return
    said = [ln for ln in err.splitlines() if ln.startswith("steplm: reading checkpoint")]
    why = {"checkpoint": "", "copied": "", "checkpoints": f": the newest intact one of {model}",
           "unfinished": f": the newest intact one of {model}, which has no final model"}[where]
    assert said == [f"steplm: reading checkpoint {ckpt} (step {step}{why})"], err
    if name == "export":
        hf = json.loads((tmp_path / "hf" / "config.json").read_text())
        assert hf["steplm"]["checkpoint"] == {"path": str(ckpt), "step": step, "layers": hf["num_hidden_layers"]}
        back, ours = load_model_dir(tmp_path / "hf"), load_model_dir(ckpt)
        a, b = weights(back.model), weights(ours.model)
        assert all(torch.equal(a[k], b[k]) for k in b)
    if name == "eval":
        assert json.loads(out)["tokens"] == 512 - 512 % 256 and json.loads(out)["loss"] > 0


def test_init_from_a_finished_run_starts_from_its_final_model(step_run, tmp_path, capsys):
    """A finished steplm run is a model for --init-from as it is for eval: no export needed."""
    from steplm.config import load

    cfg = load(None, [f"data.path={shared('shakespeare/input.txt')}"], init_from=str(step_run))
    final = json.loads((step_run / "model_config.json").read_text())
    assert cfg.model.n_layers == final["n_layers"] == 4 and cfg.model.d_model == final["d_model"]
    assert cfg.data.tokenizer == str(step_run)  # its tokenizer.json, used as-is
    argv = _command("train --init-from", str(step_run), tmp_path)
    assert main(argv) == 0, capsys.readouterr().err
    assert "reading checkpoint" not in capsys.readouterr().err
    s = json.loads((tmp_path / "grown" / "summary.json").read_text())
    assert s["layers_per_stage"] == [4]
