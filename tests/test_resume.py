"""Kill-and-resume with real subprocesses and real SIGKILLs, preemption by real SIGTERM/SIGUSR1,
checkpoint corruption, faults."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from steplm.train.checkpoint import list_steps
from steplm.errors import EXIT_PREEMPTED, EXIT_TRAINING_STOPPED

from conftest import ROOT, tiny_overrides

METHODS = {
    # stage_steps: vanilla [16]; step3 [4, 4, 7] (FLOPs-matched); relora [4, 12] with resets every 3
    "vanilla": {},
    "step3": {"method": "step", "step.n_stages": 3, "step.layers_per_stage": "[2,1,1]"},
    "relora": {"method": "relora", "lora.relora_interval": 3, "lora.relora_warmup": 2,
               "lora.warm_start_fraction": 0.25},
    "accum": {"train.grad_accum": 3},  # [16] steps of 3 micro-batches
}


def cmd(tmp_path, out, method, **extra):
    sets = tiny_overrides(tmp_path, **{"train.max_steps": 16, "train.checkpoint_every": 1,
                                       "train.keep_checkpoints": 2, "train.eval_every": 5, **METHODS[method], **extra})
    return [sys.executable, "-m", "steplm", "train", "--out", str(out), "--quiet",
            *[x for kv in sets for x in ("--set", kv)]]


def run(args, fault=None, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    env.pop("STEPLM_FAULT", None)
    if fault:
        env["STEPLM_FAULT"] = fault
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, **kw)


def losses(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["stage"], r.get("loss"), r.get("val_loss")) for r in rows]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    out = {}
    for method in METHODS:
        d = tmp / method
        res = run(cmd(tmp, d, method))
        assert res.returncode == 0, res.stderr
        assert "warning" not in res.stderr, res.stderr  # a run that learns is not told it learned nothing
        out[method] = (json.loads((d / "summary.json").read_text()), losses(d), tmp)
    return out


def stage_bounds(summary):
    return summary["stage_steps"]


@pytest.mark.parametrize("method,where", [
    ("vanilla", "inside"), ("vanilla", "late"),
    ("step3", "inside"), ("step3", "before_growth"), ("step3", "at_growth"), ("step3", "stage2"), ("step3", "stage3"),
    ("relora", "inside"), ("relora", "at_growth"), ("relora", "stage2"),
])
def test_sigkill_then_resume_is_bitwise_identical(references, tmp_path, method, where):
    ref, ref_losses, cache_tmp = references[method]
    s = stage_bounds(ref)
    step = {"inside": 2, "late": 13, "before_growth": s[0] - 1, "at_growth": s[0], "stage2": s[0] + 2,
            "stage3": sum(s[:2]) + 1}[where]
    out = tmp_path / "run"
    args = cmd(cache_tmp, out, method)
    killed = run(args, fault=f"kill_after_step:{step}")
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()
    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["weights_sha256"] == ref["weights_sha256"]
    assert losses(out) == ref_losses
    timing = {"peak_bytes", "step_seconds"}  # wall-clock and allocator timing, not run state
    assert [{k: v for k, v in a.items() if k not in timing} for a in summary["stages"]] == \
        [{k: v for k, v in b.items() if k not in timing} for b in ref["stages"]]


def test_kill_inside_checkpoint_write_falls_back(references, tmp_path):
    ref, ref_losses, cache_tmp = references["step3"]
    out = tmp_path / "run"
    args = cmd(cache_tmp, out, "step3")
    assert run(args, fault="kill_in_checkpoint:6").returncode == -signal.SIGKILL
    assert any(".tmp-" in p.name for p in (out / "checkpoints").iterdir())  # the torn write is left behind
    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "summary.json").read_text())["weights_sha256"] == ref["weights_sha256"]


def test_external_sigkill_at_an_arbitrary_moment(references, tmp_path):
    ref, ref_losses, cache_tmp = references["step3"]
    out = tmp_path / "run"
    args = cmd(cache_tmp, out, "step3")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        ck = out / "checkpoints"
        if ck.is_dir() and len([p for p in ck.iterdir() if p.name.startswith("step_")]) >= 1:
            time.sleep(0.3)
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "summary.json").read_text())["weights_sha256"] == ref["weights_sha256"]
    assert losses(out) == ref_losses


def test_corrupted_checkpoint_falls_back_to_previous(references, tmp_path):
    ref, ref_losses, cache_tmp = references["vanilla"]
    out = tmp_path / "run"
    args = cmd(cache_tmp, out, "vanilla")
    assert run(args, fault="kill_after_step:9").returncode == -signal.SIGKILL
    newest = out / "checkpoints" / "step_00000009" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr
    assert "step_00000009 is corrupt" in resumed.stderr and "falling back" in resumed.stderr
    assert json.loads((out / "summary.json").read_text())["weights_sha256"] == ref["weights_sha256"]


def test_keeps_last_n_checkpoints(references, tmp_path):
    _, _, cache_tmp = references["vanilla"]
    out = tmp_path / "run"
    assert run(cmd(cache_tmp, out, "vanilla")).returncode == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000015", "step_00000016"]


def test_full_disk_while_checkpointing(references, tmp_path):
    _, _, cache_tmp = references["vanilla"]
    out = tmp_path / "run"
    res = run(cmd(cache_tmp, out, "vanilla"), fault="enospc_in_checkpoint:3")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "No space left" in lines[0] and "previous checkpoint is kept" in lines[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]


def test_nan_loss_is_skipped_and_counted(references, tmp_path):
    _, _, cache_tmp = references["vanilla"]
    out = tmp_path / "run"
    res = run(cmd(cache_tmp, out, "vanilla"), fault="nan_at_step:5")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert rows[4]["step"] == 5 and rows[4]["loss"] == "nan" and rows[4]["skipped"] == 1
    assert rows[-1]["skipped"] == 1
    for line in (out / "metrics.jsonl").read_text().splitlines():  # strict JSON: no bare NaN/Infinity
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c} in {line}"))


def test_nan_loss_stops_keeping_last_good_checkpoint(references, tmp_path):
    _, _, cache_tmp = references["vanilla"]
    out = tmp_path / "run"
    res = run(cmd(cache_tmp, out, "vanilla", **{"train.on_nonfinite": "stop"}), fault="nan_at_step:5")
    assert res.returncode == EXIT_TRAINING_STOPPED
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "step 5" in lines[0] and "the last good checkpoint (step 4) is kept" in lines[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000003", "step_00000004"]


def test_resume_refuses_a_different_config_but_allows_safe_keys(references, tmp_path):
    _, _, cache_tmp = references["vanilla"]
    out = tmp_path / "run"
    args = cmd(cache_tmp, out, "vanilla")
    assert run(args, fault="kill_after_step:4").returncode == -signal.SIGKILL
    res = run(cmd(cache_tmp, out, "vanilla", **{"train.lr": 0.5, "model.n_heads": 4}))
    assert res.returncode == 2 and "train.lr" in res.stderr and "model.n_heads" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = run(cmd(cache_tmp, out, "vanilla", **{"train.log_every": 2}))
    assert res.returncode == 0, res.stderr
    fresh = run(args + ["--fresh"])
    assert fresh.returncode == 2 and "--fresh" in fresh.stderr


@pytest.mark.parametrize("change", ["shortened", "edited", "touched"])
def test_resume_refuses_other_data_but_not_a_new_file_time(references, tmp_path, change):
    """The data position in a checkpoint means a place in its token stream: a resume over a corpus
    that was shortened, or edited to the same length, is refused in one line; the same text with a new
    modification time (a copy, a touch) resumes."""
    _, _, cache_tmp = references["vanilla"]
    from conftest import shared
    text = shared("shakespeare/input.txt").read_text()
    data = tmp_path / "corpus.txt"
    data.write_text(text)
    out = tmp_path / "run"
    args = cmd(cache_tmp, out, "vanilla", **{"data.path": str(data)})
    assert run(args, fault="kill_after_step:4").returncode == -signal.SIGKILL
    new = {"shortened": text[: len(text) // 2], "edited": text.replace("e", "a"), "touched": text}[change]
    time.sleep(0.01)
    data.write_text(new)
    os.utime(data, (time.time() + 10, time.time() + 10))
    res = run(args)
    if change == "touched":
        assert res.returncode == 0, res.stderr
    else:
        assert res.returncode == 2 and "data.path: the data differ from those the checkpoint" in only_line(res.stderr)


def only_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.parametrize("method,where,signame", [("vanilla", "inside", "SIGTERM"), ("step3", "stage2", "SIGUSR1")])
def test_preemption_signal_checkpoints_and_resume_is_identical(references, tmp_path, method, where, signame):
    """The process sends itself a real SIGTERM/SIGUSR1 after step N. Periodic checkpoints are off, so
    the only checkpoint is the one the signal caused."""
    ref, ref_losses, cache_tmp = references[method]
    step = {"inside": 3, "stage2": ref["stage_steps"][0] + 2}[where]
    out = tmp_path / "run"
    args = cmd(cache_tmp, out, method, **{"train.checkpoint_every": 0})
    stopped = run(args, fault=f"{signame.lower()}_after_step:{step}")
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr
    line = only_line(stopped.stderr)
    assert "preempted" in line and signame in line and f"after step {step}" in line and "resume" in line, line
    assert list_steps(out / "checkpoints") == [step]
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()
    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["weights_sha256"] == ref["weights_sha256"]
    assert losses(out) == ref_losses


@pytest.mark.parametrize("step,signame", [(1, "SIGTERM"), (6, "SIGUSR1")])
def test_preemption_between_micro_batches_drops_the_step_and_resume_is_identical(references, tmp_path, step,
                                                                                 signame):
    """A signal after the first of step N's 3 micro-batches: the run does not finish the step (one may
    outlast a scheduler's grace period) but checkpoints step N-1 with its data position rewound to the
    step's start, so the resume redoes step N on the same batches."""
    ref, ref_losses, cache_tmp = references["accum"]
    out = tmp_path / "run"
    args = cmd(cache_tmp, out, "accum", **{"train.checkpoint_every": 0})
    stopped = run(args, fault=f"{signame.lower()}_mid_step:{step}")
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr
    line = only_line(stopped.stderr)
    assert f"preempted: {signame} after step {step - 1}:" in line, line
    assert list_steps(out / "checkpoints") == [step - 1]
    assert not (out / "summary.json").exists()
    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "summary.json").read_text())["weights_sha256"] == ref["weights_sha256"]
    assert losses(out) == ref_losses


def start_until(args: list[str], out: Path, ready) -> subprocess.Popen:
    """Start ``steplm train`` (args) in a subprocess, stdout discarded, stderr piped, and return once
    ``ready(text of out/metrics.jsonl)`` holds, the process has ended, or 120 s have passed."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    env.pop("STEPLM_FAULT", None)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        m = out / "metrics.jsonl"
        if m.is_file() and ready(m.read_text()):
            break
        time.sleep(0.01)
    return proc


def test_preemption_signal_from_outside(references, tmp_path):
    """SIGTERM from another process at whatever step the run has reached."""
    ref, ref_losses, cache_tmp = references["step3"]
    out = tmp_path / "run"
    args = cmd(cache_tmp, out, "step3", **{"train.checkpoint_every": 0})
    proc = start_until(args, out, lambda text: text.count("\n") >= 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert "preempted: SIGTERM after step" in only_line(err)
    steps = list_steps(out / "checkpoints")
    assert len(steps) == 1 and 1 <= steps[0] < sum(ref["stage_steps"])
    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "summary.json").read_text())["weights_sha256"] == ref["weights_sha256"]
    assert losses(out) == ref_losses


@pytest.mark.parametrize("checks", ["log_step", "checkpoint"])
def test_weights_that_turn_non_finite_stop_the_run(references, tmp_path, checks):
    """Finite hyperparameters can still poison the weights: lr·weight_decay = 1e40 overflows fp32, so
    step 1's decay makes the weights infinite. Whichever check sees it first (the log step's, or the
    checkpoint's) stops the run with its own exit code; no poisoned checkpoint or model is written."""
    _, _, cache_tmp = references["vanilla"]
    out = tmp_path / "run"
    every = {"log_step": {"train.checkpoint_every": 0, "train.log_every": 1},
             "checkpoint": {"train.checkpoint_every": 1, "train.log_every": 100}}[checks]
    res = run(cmd(cache_tmp, out, "vanilla", **{"train.lr": 1e30, "train.weight_decay": 1e10, **every}))
    assert res.returncode == EXIT_TRAINING_STOPPED, res.stderr
    line = only_line(res.stderr)
    assert "step 1: the weights are not finite" in line and checks.replace("_", " ") in line, line
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()
    assert list_steps(out / "checkpoints") == []


@pytest.mark.parametrize("method,lr", [("vanilla", 10.0), ("vanilla", 30.0), ("step3", 10.0)])
def test_a_finite_divergence_stops_the_run(references, tmp_path, method, lr):
    """Finite weights, but a final validation loss above ln(vocab_size) (worse than a uniform guess,
    where training starts): exit 3, one line naming train.lr, no model or summary, checkpoints kept."""
    _, _, cache_tmp = references[method]
    out = tmp_path / "run"
    res = run(cmd(cache_tmp, out, method, **{"train.lr": lr}))
    assert res.returncode == EXIT_TRAINING_STOPPED, res.stderr
    line = only_line(res.stderr)
    assert "above ln(vocab_size) = 6.238" in line and "lower train.lr" in line, line  # ln 512, tiny_overrides' bpe
    val = float(line.split("final validation loss ")[1].split()[0])
    assert val > 6.238 + 1
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()
    assert list_steps(out / "checkpoints")


@pytest.mark.parametrize("method,lr", [("vanilla", 1e-30), ("step3", 1e-30)])
def test_a_run_that_learns_nothing_is_told_so(references, tmp_path, method, lr):
    """An lr too small to move a weight leaves the loss where it starts, within a few hundredths of
    ln(vocab_size) (either side): the run ends and writes its model, but says in one warning line that
    it learned nothing."""
    _, _, cache_tmp = references[method]
    out = tmp_path / "run"
    res = run(cmd(cache_tmp, out, method, **{"train.lr": lr}))
    assert res.returncode == 0, res.stderr
    warnings = [line for line in res.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "not 0.1 below ln(vocab_size) = 6.238" in warnings[0], res.stderr
    assert "check train.lr" in warnings[0]
    assert abs(json.loads((out / "summary.json").read_text())["final_val_loss"] - math.log(512)) < 0.1


@pytest.mark.slow
@pytest.mark.parametrize("states", ["8bit", "bf16"])
def test_sigkill_resume_with_low_precision_optimizer_states(references, tmp_path, states):
    """Quantized (torchao 8-bit) and bf16 (torch-optimi, bf16 master weights) optimizer states go
    through the checkpoint and back: a STEP run killed inside stage 2 resumes to the same weights as
    an uninterrupted run, bit for bit."""
    _, _, cache_tmp = references["vanilla"]
    extra = {"train.optimizer_states": states}
    if states == "bf16":
        extra["train.master_weights"] = "bf16"
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    done = run(cmd(cache_tmp, ref_out, "step3", **extra))
    assert done.returncode == 0, done.stderr
    ref = json.loads((ref_out / "summary.json").read_text())
    step = sum(ref["stage_steps"][:1]) + 2
    args = cmd(cache_tmp, out, "step3", **extra)
    assert run(args, fault=f"kill_after_step:{step}").returncode == -signal.SIGKILL
    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "summary.json").read_text())["weights_sha256"] == ref["weights_sha256"]
    assert losses(out) == losses(ref_out)


# -- a run is never lost: Ctrl-C, errors, periodic checkpoints by default --------------------------
@pytest.fixture(scope="module")
def cache_tmp(tmp_path_factory):
    """The token cache of these tests (tiny_overrides puts it under the folder it is given)."""
    return tmp_path_factory.mktemp("kept")


def interruptible(cache_tmp, out, **extra):
    """A 40-step vanilla run with the default checkpoint_every (auto) and, for identical weights from
    process to process, the system allocator; not --quiet, as a user types it."""
    sets = tiny_overrides(cache_tmp, **{"train.max_steps": 40, "train.host_allocator": "system", **extra})
    return [sys.executable, "-m", "steplm", "train", "--out", str(out), *[x for kv in sets for x in ("--set", kv)]]


def test_sigint_checkpoints_the_last_whole_step_and_the_printed_command_resumes(cache_tmp, tmp_path):
    """A real SIGINT (Ctrl-C) from outside while a real `steplm train` trains: it checkpoints the last
    whole step, keeps the folder and its metrics.jsonl, exits 130 naming the command that resumes;
    that command (run as printed) ends with the same weights and loss rows as an uninterrupted run."""
    import re
    import shlex

    ref = tmp_path / "ref"
    assert run(interruptible(cache_tmp, ref)).returncode == 0
    out = tmp_path / "run"
    args = interruptible(cache_tmp, out)
    proc = start_until(args, out, lambda text: '"loss"' in text)  # it has taken a step
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    found = re.fullmatch(r"steplm: interrupted: SIGINT after step (\d+): checkpoint (\S+) written; resume with: (.+)",
                         last)
    assert found, err
    step = int(found[1])
    assert 1 <= step < 40 and Path(found[2]) == out / "checkpoints" / f"step_{step:08d}"
    assert "stopping after this step to write a checkpoint" in err  # said at once, not only at the end
    assert list_steps(out / "checkpoints")[-1] == step
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, step + 1))  # the folder and its log survive
    assert (out / "config.yaml").is_file() and not (out / "summary.json").exists()
    printed = shlex.split(found[3])
    assert printed == ["steplm", *args[3:]]
    resumed = run([sys.executable, "-m", *printed])
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["weights_sha256"] == json.loads((ref / "summary.json").read_text())["weights_sha256"]
    assert losses(out) == losses(ref)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in rows if "elapsed_s" in r]
    assert elapsed == sorted(elapsed)  # the clock goes on across the resume


def test_the_resume_command_drops_fresh_and_quotes_paths():
    from steplm.cli.main import resume_command
    assert resume_command(["train", "c.yaml", "--fresh", "--out", "my runs/a", "--set", "train.lr=1e-3"]) == \
        "steplm train c.yaml --out 'my runs/a' --set train.lr=1e-3"


@pytest.mark.parametrize("fault,every,code", [
    ("raise_after_step:3", 0, None),  # a bug mid-run: the traceback's exception, no checkpoint at all
    ("enospc_in_checkpoint:2", 2, 2),  # a full disk at the first checkpoint: one line, exit 2
    ("nan_every:1", 0, EXIT_TRAINING_STOPPED),  # a run that cannot train: exit 3
])
def test_a_run_that_fails_mid_run_keeps_everything_it_wrote(cache_tmp, tmp_path, capsys, monkeypatch, fault, every,
                                                            code):
    """However a run that has begun ends, its folder stays with its config, tokenizer and metrics
    (before, a run without a checkpoint lost its folder); a rerun of the same command says it starts
    over. A run that fails to start still removes its folder (tests/test_bad_input.py)."""
    from steplm.cli import main

    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--quiet", *[x for kv in tiny_overrides(
        cache_tmp, **{"train.checkpoint_every": every}) for x in ("--set", kv)]]
    monkeypatch.setenv("STEPLM_FAULT", fault)
    if code is None:
        with pytest.raises(RuntimeError, match="injected fault after step 3"):
            main(argv)
    else:
        assert main(argv) == code
    capsys.readouterr()
    assert (out / "config.yaml").is_file() and (out / "tokenizer.json").is_file()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["step"] >= 2
    assert list_steps(out / "checkpoints") == [] and not (out / "summary.json").exists()
    monkeypatch.delenv("STEPLM_FAULT")
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "holds a run that ended before its first checkpoint; it starts again from step 0" in err, err


def test_a_rerun_into_a_kept_folder_with_another_config_is_refused(cache_tmp, tmp_path, capsys, monkeypatch):
    """The folder of a run that stopped before its first checkpoint still belongs to that run."""
    from steplm.cli import main

    out = tmp_path / "run"
    sets = tiny_overrides(cache_tmp, **{"train.checkpoint_every": 0})
    monkeypatch.setenv("STEPLM_FAULT", "raise_after_step:2")
    with pytest.raises(RuntimeError):
        main(["train", "--out", str(out), "--quiet", *[x for kv in sets for x in ("--set", kv)]])
    monkeypatch.delenv("STEPLM_FAULT")
    before = (out / "metrics.jsonl").read_bytes()
    assert main(["train", "--out", str(out), "--quiet", "--lr", "0.5",
                 *[x for kv in sets for x in ("--set", kv)]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("holds a run with a different config (--lr); use the same config to resume, "
                            "or another --out"), err
    assert (out / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize("every,total,expected", [
    (None, 1, 1), (None, 10, 1), (None, 11, 2), (None, 64, 7), (None, 160, 16), (None, 10_000, 1000),
    (None, 33_000, 1000), (0, 100, 0), (5, 100, 5), (500, 10, 500),
])
def test_checkpoint_interval_auto_is_a_tenth_of_the_run_at_most_1000_steps(every, total, expected):
    from steplm.train.saving import checkpoint_interval
    assert checkpoint_interval(every, total) == expected


def test_a_run_checkpoints_by_default(tiny_run):
    """conftest's tiny run sets no train.checkpoint_every: 12 steps checkpoint every ceil(12/10) = 2,
    the newest train.keep_checkpoints (3) kept."""
    from steplm import config as config_mod
    assert config_mod.load(tiny_run / "config.yaml").train.checkpoint_every is None
    assert list_steps(tiny_run / "checkpoints") == [8, 10, 12]


@pytest.mark.parametrize("flag,expected", [("auto", None), ("0", 0), ("25", 25)])
def test_checkpoint_every_auto_on_the_command_line_overrides_a_config(tmp_path, flag, expected):
    from steplm.cli.main import build_parser
    from steplm.cli.train_cmd import load_config

    preset = tmp_path / "c.yaml"
    preset.write_text("train:\n  checkpoint_every: 100\n")
    a = build_parser().parse_args(["train", str(preset), "--out", str(tmp_path / "o"), "--checkpoint-every", flag])
    assert load_config(a).train.checkpoint_every == expected
