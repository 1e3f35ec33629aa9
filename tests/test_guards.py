"""A run that cannot train stops (train/guards.py bad_batch): more than 3 skipped steps in a row, or
more than half of the steps once 8 have run, end the run with exit 3 and one line naming the keys to
change; a rare bad batch is still skipped and counted and the run finishes."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from steplm import config
from steplm.errors import EXIT_TRAINING_STOPPED, TrainingStopped
from steplm.train import guards
from steplm.train.state import TrainState
from steplm.train.task import PretrainTask

from conftest import ROOT, shared, tiny_overrides

NAN = float("nan")


def fake_run(tmp_path, **sets):
    """What bad_batch reads of a Trainer: config, counters, stage name, task keys, model, folder."""
    cfg = config.load(None, tiny_overrides(tmp_path, **sets))
    return SimpleNamespace(cfg=cfg, state=TrainState(), step=0, task=PretrainTask(), model=torch.nn.Linear(2, 2),
                           out=tmp_path / "run", stage_name=lambda: "stage 1 of 1")


def feed(run, pattern: str) -> int:
    """Steps in ``pattern`` ('x' a bad batch, '.' a good one) through bad_batch and check_training, as
    the loop calls them; returns the steps taken. TrainingStopped propagates."""
    for i, c in enumerate(pattern):
        run.step = i
        loss = NAN if c == "x" else 2.5
        skipped = guards.bad_batch(run, loss, 1.0)
        assert skipped == (c == "x")
        run.step = i + 1  # the loop counts the step, writes its row, then judges
        if skipped:
            guards.check_training(run, loss, 1.0)
    return len(pattern)


@pytest.mark.parametrize("pattern", [
    "xxx" + "." * 20,         # 3 in a row: still noise (the limit's near side)
    "..xxx....xxx" + "." * 8,  # twice 3 in a row, 6 of 20, at most half of every prefix
    ".x" * 20,                # exactly half, never more
    ".xxx",                   # 3 of 4 skipped, but fewer than 8 steps: no majority yet
    "." * 19 + "x",           # one bad batch in 20
])
def test_a_rare_or_short_run_of_bad_batches_is_skipped_and_counted(tmp_path, pattern):
    run = fake_run(tmp_path)
    assert feed(run, pattern) == len(pattern)
    assert run.state.skipped == pattern.count("x")
    assert run.state.skipped_in_row == len(pattern) - len(pattern.rstrip("x"))


@pytest.mark.parametrize("pattern,stop_at,count", [
    ("xxxx", 4, "4 steps in a row"),               # the limit's far side, from the first step
    ("...xxxx....", 7, "4 steps in a row"),
    ("xx." * 4, 8, "6 of its 8 steps"),            # never 4 in a row, but most steps from step 8 on
    (".xxx" * 3, 8, "6 of its 8 steps"),
])
def test_consecutive_or_mostly_skipped_steps_stop_the_run(tmp_path, pattern, stop_at, count):
    run = fake_run(tmp_path)
    with pytest.raises(TrainingStopped) as e:
        feed(run, pattern)
    assert run.step == stop_at
    msg = str(e.value)
    assert f"stage 1 of 1, step {stop_at}: {count} were skipped as bad batches (the last: loss nan" in msg, msg
    assert "lower train.lr" in msg and "there is no checkpoint to resume from" in msg, msg


@pytest.mark.parametrize("sets,named,unnamed", [
    ({"train.grad_clip": 0, "train.warmup_steps": 0}, ["train.lr", "train.grad_clip", "train.warmup_steps"], []),
    ({"train.grad_clip": 1.0, "train.warmup_steps": 0}, ["train.lr", "train.warmup_steps"], ["train.grad_clip"]),
    ({"train.grad_clip": 0, "train.warmup_steps": 5}, ["train.lr", "train.grad_clip"], ["train.warmup_steps"]),
    ({"train.grad_clip": 1.0, "train.warmup_steps": 5}, ["train.lr"], ["train.grad_clip", "train.warmup_steps"]),
])
def test_the_stop_names_the_keys_that_are_likely_the_cause(tmp_path, sets, named, unnamed):
    """lr always; clipping and warmup only when they are off (turning on what is on helps no one)."""
    run = fake_run(tmp_path, **sets)
    with pytest.raises(TrainingStopped) as e:
        feed(run, "xxxx")
    msg = str(e.value)
    assert all(k in msg for k in named) and not any(k in msg for k in unnamed), msg


def test_an_applied_step_resets_the_count_in_a_row_which_a_checkpoint_keeps(tmp_path):
    run = fake_run(tmp_path)
    feed(run, "xx.xxx")
    assert run.state.skipped_in_row == 3 and run.state.skipped == 5
    assert run.state.state_dict()["skipped_in_row"] == 3  # resumed mid-streak, the streak goes on
    resumed = TrainState()
    resumed.load_state_dict(run.state.state_dict())
    assert resumed.skipped_in_row == 3


def cli(args, fault=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    env.pop("STEPLM_FAULT", None)
    if fault:
        env["STEPLM_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "steplm", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_the_issue_recipe_stops_with_exit_3_naming_lr_clipping_and_warmup(tmp_path):
    """Issue 34, finding 9: lr 1e30 without warmup or clipping on configs/tiny.yaml. Step 1 is applied
    (finite loss at init), then every step is a bad batch: the 4th in a row, step 5, stops the run
    (it used to end with exit 0 and a written model)."""
    out = tmp_path / "run"
    res = cli(["train", str(ROOT / "configs" / "tiny.yaml"), "--data", str(shared("shakespeare/input.txt")),
               "--out", str(out), "--max-steps", "6", "--quiet", "--set", "train.lr=1e30",
               "--set", "train.warmup_steps=0", "--set", "train.grad_clip=0"])  # the session's token cache
    assert res.returncode == EXIT_TRAINING_STOPPED, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("steplm: stopped: stage 1 of 1, step 5: 4 steps in a row"), lines
    assert all(k in lines[0] for k in ("lower train.lr", "train.grad_clip is 0", "train.warmup_steps is 0")), lines
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # kept: the folder shows what happened (tiny.yaml logs every 10 steps, and every skipped one)
    rows = [r for r in rows if "loss" in r]
    assert [(r["step"], r["skipped"]) for r in rows] == [(2, 1), (3, 2), (4, 3), (5, 4)]
    assert all(isinstance(r["loss"], str) or isinstance(r["grad_norm"], str) for r in rows), rows  # nan/inf


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One token cache for this module's runs (tiny_overrides puts it under the folder it is given)."""
    return tmp_path_factory.mktemp("tokens")


def _train(tmp_path, capsys, fault=None, monkeypatch=None, cache=None, **sets):
    from steplm.cli import main
    if fault:
        monkeypatch.setenv("STEPLM_FAULT", fault)
    out = tmp_path / "run"
    rc = main(["train", "--out", str(out), "--quiet", *[x for kv in tiny_overrides(cache, **sets)
                                                           for x in ("--set", kv)]])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return rc, capsys.readouterr().err.strip().splitlines(), [r for r in rows if "loss" in r], out


def test_an_enormous_lr_with_clipping_on_stops_and_does_not_name_clipping(tmp_path, capsys, cache):
    """Clipping cannot tame Adam's normalised update: lr 1e30 with grad_clip 1 (the default) overflows
    the model after step 1 all the same."""
    rc, err, rows, out = _train(tmp_path, capsys, cache=cache, **{"train.lr": 1e30})
    assert rc == EXIT_TRAINING_STOPPED
    assert len(err) == 1 and "4 steps in a row were skipped" in err[0] and "lower train.lr" in err[0], err
    assert "train.grad_clip" not in err[0] and "train.warmup_steps" not in err[0], err  # clipping on, warmup 2
    assert rows[0]["skipped"] == 0 and rows[-1]["skipped"] == 4 and rows[-1]["step"] == 5  # the stop's row too


def test_a_nan_in_every_batch_stops_at_the_fourth_step(tmp_path, capsys, monkeypatch, cache):
    rc, err, rows, out = _train(tmp_path, capsys, "nan_every:1", monkeypatch, cache)
    assert rc == EXIT_TRAINING_STOPPED
    assert len(err) == 1 and "stage 1 of 1, step 4: 4 steps in a row" in err[0] and "loss nan" in err[0], err
    assert [r["loss"] for r in rows] == ["nan"] * 4 and rows[-1]["skipped"] == 4


@pytest.mark.parametrize("fault,skipped_steps", [("nan_at_step:7", [7]), ("nan_every:7", [7, 14])])
def test_a_rare_bad_batch_is_skipped_and_the_run_finishes(tmp_path, capsys, monkeypatch, cache, fault,
                                                           skipped_steps):
    rc, err, rows, out = _train(tmp_path, capsys, fault, monkeypatch, cache, **{"train.max_steps": 20})
    assert rc == 0, err
    assert [r["step"] for r in rows if r["loss"] == "nan"] == skipped_steps
    assert rows[-1]["step"] == 20 and rows[-1]["skipped"] == len(skipped_steps)
    assert (out / "summary.json").is_file() and not math.isnan(json.loads((out / "summary.json").read_text())
                                                                   ["final_val_loss"])
