"""End-to-end CLI: train, eval (steplm vs transformers backend), export, and one-line errors."""
import json
import os
import subprocess
import sys

import pytest

from steplm.cli import main

from conftest import ROOT, shared, tiny_overrides


def run_cli(*args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, "-m", "steplm", *args], capture_output=True, text=True, env=env,
                          cwd=kw.get("cwd", ROOT), timeout=300)


def assert_one_line_error(res, *needles):
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_train_cli_writes_summary(tmp_path):
    out = tmp_path / "run"
    sets = [x for kv in tiny_overrides(tmp_path) for x in ("--set", kv)]
    res = run_cli("train", "--out", str(out), "--quiet", *sets)
    assert res.returncode == 0, res.stderr
    s = json.loads((out / "summary.json").read_text())
    for key in ("final_val_loss", "final_val_ppl", "tokens_seen", "flops", "train_seconds", "weights_sha256", "params"):
        assert key in s
    assert s["tokens_seen"] == 12 * 4 * 32
    P = s["params"]
    assert P["embedding"] + P["non_embedding"] == P["total"] == P["trainable"] + P["frozen"]
    # paper convention C = 6·N·T over non-embedding parameters
    assert s["flops"] == 6 * P["non_embedding"] * s["tokens_seen"] - 6 * 32 * s["tokens_seen"]  # minus final norm
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in r and "stage" in r for r in rows)
    assert json.loads(res.stdout)["weights_sha256"] == s["weights_sha256"]


def test_eval_backends_agree_on_wikitext(tiny_run, tmp_path):
    pytest.importorskip("transformers")
    wiki = str(shared("wikitext2/valid.txt"))
    hf_dir = tmp_path / "hf"
    assert main(["export", str(tiny_run), "--to", str(hf_dir)]) == 0
    res_a = run_cli("eval", str(tiny_run), "--data", wiki, "--max-tokens", "4096", "--json")
    res_b = run_cli("eval", str(hf_dir), "--data", wiki, "--max-tokens", "4096", "--json", "--backend", "transformers")
    assert res_a.returncode == 0 and res_b.returncode == 0, res_a.stderr + res_b.stderr
    # nothing but the result: no torchao kernel-load or pytree warnings, no tokenizer length warning
    assert res_a.stderr == "" and res_b.stderr == "", res_a.stderr + res_b.stderr
    a, b = json.loads(res_a.stdout), json.loads(res_b.stdout)
    assert a["tokens"] == b["tokens"] > 3000
    assert abs(a["loss"] - b["loss"]) / a["loss"] <= 1e-4
    assert abs(a["ppl"] - 2.718281828 ** a["loss"]) < 1e-6 * a["ppl"]


def test_export_loads_with_auto_classes(tiny_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch
    from steplm.io.run_dir import load_run

    out = tmp_path / "hf"
    assert main(["export", str(tiny_run), "--to", str(out)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    ours, our_tok = load_run(tiny_run)
    text = "To be, or not to be"
    ids = tok(text)["input_ids"]
    assert ids == our_tok.encode(text).ids
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, ours(x), atol=1e-5)


@pytest.mark.parametrize("args,needles", [
    (["train", "--out", "{tmp}/o", "--data", "{tmp}/missing.txt"], ["--data: ", "does not exist"]),
    (["train", "--out", "{tmp}/o", "--data", "{tmp}/empty.txt", "--set", "data.tokenizer=bpe:300"], ["empty corpus"]),
    (["train", "--out", "{tmp}/o", "--set", "train.bogus=1"], ["unknown config key: train.bogus"]),
    (["train", "--out", "{tmp}/o", "--set", "model.d_model=30", "--set", "model.n_heads=4"],
     ["model.d_model", "divisible"]),
    (["train", "--out", "{tmp}/o", "{tmp}/nope.yaml"], ["config file not found"]),
    (["train", "--out", "{tmp}/o", "--max-steps", "-3"], ["--max-steps"]),
    (["eval", "{tmp}", "--data", "{tmp}/empty.txt"], ["MODEL"]),
    (["export", "{tmp}/none", "--to", "{tmp}/x"], ["RUN_DIR"]),
    (["plan", "--hidden", "64", "--layers", "0"], ["--layers"]),
    (["frobnicate"], ["unknown subcommand: 'frobnicate' (choose from 'train'"]),
    ([], ["give a subcommand: train, eval", "steplm --help"]),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, needles):
    (tmp_path / "empty.txt").write_text("")
    res = run_cli(*[a.format(tmp=tmp_path) for a in args])
    assert_one_line_error(res, *needles)
    assert not (tmp_path / "o").exists() and not (tmp_path / "x").exists()  # nothing half-written


@pytest.mark.parametrize("argv,flag", [
    (["train", "--out", "o", "--max-steps", "-5x"], "--max-steps"),
    (["train", "--out", "o", "--max-steps", "-.5"], "--max-steps"),
    (["sft", "run", "--lr", "-1e-3"], "--lr"),
    (["export", "run", "--out", "o", "--max-shard-size", "-5GB"], "--max-shard-size"),
    (["plan", "--hidden", "64", "--budget-gb", "-1e-2"], "--budget-gb"),
    (["generate", "run", "--prompt", "hi", "--top-k", "-1e2"], "--top-k"),
])
def test_a_value_that_looks_like_an_option_is_judged_as_a_value(tmp_path, capsys, monkeypatch, argv, flag):
    """'--lr -1e-3' is a bad value for --lr, not a missing one: the one line names the flag and the
    value, never argparse's "expected one argument"."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    value = argv[argv.index(flag) + 1]
    assert len(err.splitlines()) == 1 and flag in err and value in err and "expected one argument" not in err, err
    assert not any(tmp_path.iterdir())


def test_every_argument_of_every_subcommand_has_help():
    """`steplm CMD --help` explains every argument: none is printed bare."""
    import argparse

    from steplm.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bare = [f"{name} {a.option_strings[0] if a.option_strings else a.dest}"
            for name, command in sub.choices.items() for a in command._actions
            if not a.help and not isinstance(a, argparse._HelpAction)]
    assert len(sub.choices) >= 9 and bare == []


@pytest.mark.parametrize("args", [
    ["plan", "--hidden", "1024", "--layers", "24", "--extended"],
    ["plan", "--hidden", "1024", "--layers", "24", "--json"],
    ["plan", str(ROOT / "configs" / "tiny.yaml")],
])
def test_a_reader_that_leaves_early_ends_the_command_quietly(args):
    """`steplm plan ... | head -1`: when the reader closes the pipe, the command stops with the status
    of a process ended by SIGPIPE (141) and no traceback, as Unix tools do."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte
    try:
        res = subprocess.run([sys.executable, "-m", "steplm", *args], stdout=write, stderr=subprocess.PIPE,
                             text=True, env=env, cwd=ROOT, timeout=120)
    finally:
        os.close(write)
    assert res.returncode == 141 and res.stderr == "", res.stderr


def test_the_error_prefix_names_steplm_once(capsys):
    assert main(["train"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "steplm: error: train: the following arguments are required: --out", err


@pytest.mark.parametrize("method", ["galore", "apollo"])
def test_a_baseline_run_prints_only_its_result(tmp_path, method):
    """galore-torch's deprecation FutureWarning and bitsandbytes' missing-CPU-kernel log (APOLLO) do
    not reach a successful run's stderr: one line says where the run went."""
    pytest.importorskip({"galore": "galore_torch", "apollo": "apollo_torch"}[method])
    sets = tiny_overrides(tmp_path, **{"method": method, f"{method}.rank": 4, "train.max_steps": 6, "train.lr": 1e-2})
    res = run_cli("train", "--out", str(tmp_path / "run"), "--quiet", *[x for kv in sets for x in ("--set", kv)])
    assert res.returncode == 0 and res.stderr.splitlines() == [
        f"run written to {tmp_path / 'run'}/ (summary.json, metrics.jsonl, model.safetensors)"], res.stderr


def test_version_prints_the_installed_version(capsys):
    from importlib.metadata import PackageNotFoundError, version

    import steplm

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    try:
        expect = version("steplm")
    except PackageNotFoundError:
        expect = steplm.__version__
    assert capsys.readouterr().out == f"steplm {expect}\n"
    res = run_cli("--version")
    assert res.returncode == 0 and res.stdout.startswith("steplm ") and res.stderr == ""


def test_info_is_aligned_key_value_lines_and_json_the_raw_dict(step_run, capsys):
    """`steplm info`: one "key: value" per line, values in one column, stages as cumulative depths,
    counts with separators; --json: the dict the lines come from."""
    s = json.loads((step_run / "summary.json").read_text())
    assert main(["info", str(step_run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    pairs = dict(ln.split(":", 1) for ln in lines)
    assert len({len(ln) - len(ln[ln.index(":") + 1:].lstrip()) for ln in lines}) == 1  # one value column
    value = {k: v.strip() for k, v in pairs.items()}
    assert value["kind"] == "steplm run" and value["method"] == "step" and value["layers"] == "4"
    assert value["stages"] == "2 -> 4 layers"
    assert value["steps per stage"] == ", ".join(f"{n:,}" for n in s["stage_steps"])
    assert value["tokens seen"] == f"{s['tokens_seen']:,}" and "," in value["tokens seen"]
    assert value["final val loss"] == f"{s['final_val_loss']:.4f}"
    assert main(["info", str(step_run), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["steplm"]["layers_per_stage"] == [2, 2] and d["model"]["n_layers"] == 4


@pytest.mark.parametrize("out", ["plots/mem.png", "plots/deeper/mem", "plots/"])
def test_plot_creates_a_missing_folder(step_run, tmp_path, capsys, monkeypatch, out):
    """--out in a folder that does not exist yet: created, as train and export create theirs."""
    monkeypatch.chdir(tmp_path)
    assert main(["plot", str(step_run), "--out", out]) == 0
    made = {"plots/mem.png": "plots/mem.png", "plots/deeper/mem": "plots/deeper/mem.png",
            "plots/": "plots/memory.png"}[out]
    assert (tmp_path / made).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().err == f"wrote {made}\n"


def test_a_plot_that_cannot_be_written_leaves_no_folder(step_run, tmp_path, capsys, monkeypatch):
    import matplotlib.figure

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", fail)
    assert main(["plot", str(step_run), "--out", str(tmp_path / "a" / "b" / "mem.png")]) == 2
    assert "--out: cannot write" in capsys.readouterr().err and not (tmp_path / "a").exists()
