"""Run guards: the run-directory lock (in-process, against a live and a killed process, and two real
concurrent `steplm train` runs), preemption signal handling, the finite-weights check, strict JSON."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from steplm import config
from steplm.io import files
from steplm.train import guards
from steplm.data.shards import prepare
from steplm.errors import EXIT_PREEMPTED, EXIT_USER_ERROR

from conftest import ROOT, tiny_overrides

ENV = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
ENV.pop("STEPLM_FAULT", None)


# ---------------------------------------------------------------------------- which --out a run may use
@pytest.mark.parametrize("files,refusal", [
    (None, None),  # missing: a new run
    ({}, None),  # empty
    ({".lock": ""}, None),  # a run killed before it wrote anything but its lock
    ({"config.yaml": "x", "metrics.jsonl": "", ".lock": "123"}, None),  # an unfinished run: resumed
    ({"config.yaml": "x", "summary.json": "{}"}, "holds a finished run"),
    ({"config.yaml": "x", "summary.json": "{}", "sft_summary.json": "{}"}, "holds a finished run"),
    ({"summary.json": "{}"}, "holds a finished run"),
    ({"config.json": "{}", "model.safetensors": "x"}, "holds no run to resume"),  # an HF export
    ({"notes.txt": "mine"}, "holds no run to resume"),
    ({"sub/config.yaml": "x"}, "holds no run to resume"),
    ("a file", "is a file"),
])
def test_check_run_dir(tmp_path, files, refusal):
    out = tmp_path / "out"
    if isinstance(files, str):
        out.write_text(files)
    elif files is not None:
        out.mkdir()
        for name, text in files.items():
            (out / name).parent.mkdir(exist_ok=True)
            (out / name).write_text(text)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    if refusal is None:
        guards.check_run_dir(out)
    else:
        with pytest.raises(guards.UserError, match=f"--out: {out} .*{refusal}"):
            guards.check_run_dir(out)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # the check writes nothing


def test_finished_run_is_refused_and_left_byte_identical(tiny_run, tmp_path, capsys):
    """`train`/`sft --out` on a finished run, and a Trainer built on it, refuse it without touching a file."""
    from steplm.cli import main
    from steplm.train.loop import Trainer

    def state():
        return {str(p.relative_to(tiny_run)): (p.stat().st_mtime_ns, p.read_bytes()) for p in tiny_run.rglob("*")
                if p.is_file()}

    before = state()
    assert main(["train", "--out", str(tiny_run), "--set", f"data.cache_dir={tmp_path}", "--quiet"]) == 2
    assert "holds a finished run" in capsys.readouterr().err
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "x", "input": "", "output": "y"}]))
    assert main(["sft", str(tiny_run), "--data", str(alpaca), "--out", str(tiny_run), "--quiet"]) == 2
    assert "holds a finished run" in capsys.readouterr().err
    with pytest.raises(guards.UserError, match="holds a finished run"):
        Trainer(config.load(tiny_run / "config.yaml"), tiny_run, progress=False)
    assert state() == before


# ---------------------------------------------------------------------------- lock
def test_lock_is_exclusive_and_released(tmp_path):
    a = guards.RunLock(tmp_path)
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    with pytest.raises(guards.RunDirInUse, match=rf"--out: .* in use by another steplm train \(pid {os.getpid()}\)"):
        guards.RunLock(tmp_path)
    a.release()
    assert (tmp_path / ".lock").read_text() == ""  # a clean release leaves no pid behind
    b = guards.RunLock(tmp_path)
    assert b.stale_pid is None
    b.release()


def test_refused_run_waits_for_a_holder_that_has_not_written_its_pid_yet(tmp_path):
    """The race of two runs started together: the winner holds the flock but its pid is not in the
    file yet. The loser must name the pid written a moment later, not "unknown"."""
    import fcntl
    import threading
    fd = os.open(tmp_path / guards.LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        writer = threading.Timer(0.3, lambda: os.pwrite(fd, b"424242\n", 0))
        writer.start()
        with pytest.raises(guards.RunDirInUse, match=r"pid 424242\)"):
            guards.RunLock(tmp_path)
        writer.join()
        os.ftruncate(fd, 0)  # a holder that never writes its pid is reported as unknown
        with pytest.raises(guards.RunDirInUse, match=r"pid unknown\)"):
            guards.RunLock(tmp_path)
    finally:
        os.close(fd)


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from steplm.train.guards import RunLock; "
                               f"lock = RunLock({str(tmp_path)!r}); print('locked', flush=True); time.sleep(120)"],
                              env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(guards.RunDirInUse, match=f"pid {holder.pid}"):
            guards.RunLock(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    lock = guards.RunLock(tmp_path)  # the kernel released the dead holder's flock
    assert lock.stale_pid == holder.pid
    lock.release()


# ---------------------------------------------------------------------------- concurrent runs
@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A tokenized tiny corpus, so that the concurrent runs below start training at once."""
    tmp = tmp_path_factory.mktemp("lockruns")
    cfg = config.load(None, tiny_overrides(tmp))
    prepare(cfg.data, tmp / "cache", progress=False)
    return tmp


def train_args(cache_tmp, out, steps):
    sets = tiny_overrides(cache_tmp, **{"train.max_steps": steps, "train.eval_tokens": 256})
    return [sys.executable, "-m", "steplm", "train", "--out", str(out), "--quiet", *[x for kv in sets for x in ("--set", kv)]]


def metric_steps(out):
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def wait_for_training(proc, out, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not (
            (out / "metrics.jsonl").is_file() and metric_steps(out)):
        time.sleep(0.05)


def stop(proc, out):
    """SIGTERM a run once it trains (a graceful stop: exit 75 after a checkpoint), or collect it if it finished."""
    wait_for_training(proc, out)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, EXIT_PREEMPTED), err
    return proc.returncode


def test_second_writer_is_refused_while_the_first_runs(cached, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(train_args(cached, out, 5000), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        wait_for_training(first, out)
        assert first.poll() is None, first.stderr.read()
        second = subprocess.run(train_args(cached, out, 5000), env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        stop(first, out)
    assert second.returncode == EXIT_USER_ERROR, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "--out" in lines[0] and f"in use by another steplm train (pid {first.pid})" in lines[0]
    steps = metric_steps(out)
    assert steps == list(range(1, len(steps) + 1))  # one writer: every step once, in order


def test_two_runs_started_together_one_is_refused(cached, tmp_path):
    out = tmp_path / "run"
    procs = [subprocess.Popen(train_args(cached, out, 5000), env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        deadline = time.time() + 180
        while time.time() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.05)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        err = loser.communicate()[1]
        assert loser.returncode == EXIT_USER_ERROR, err
        assert len(err.strip().splitlines()) == 1 and f"in use by another steplm train (pid {winner.pid})" in err
    finally:
        codes = [stop(p, out) for p in procs if p.returncode is None]
    assert codes and codes[0] in (0, EXIT_PREEMPTED)
    assert out.is_dir()  # the refused run did not clean away the winner's directory
    steps = metric_steps(out)
    assert steps and steps == list(range(1, len(steps) + 1))


# ---------------------------------------------------------------------------- signals
def test_preemption_records_the_signal_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with guards.Preemption() as p:
        assert not p.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert p.requested() and p.name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


# ---------------------------------------------------------------------------- finite weights, JSON
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_finite(dtype):
    big = torch.finfo(dtype).max
    params = [torch.zeros(0), torch.full((3, 3), big, dtype=dtype), torch.randn(5).to(dtype)]
    assert guards.all_finite(params)  # the largest finite value is finite: max |x|, no overflowing norm
    for bad in (math.nan, math.inf, -math.inf):
        poisoned = [p.clone() for p in params]
        poisoned[2][3] = bad
        assert not guards.all_finite(poisoned)
    assert guards.all_finite([])


def test_strict_json():
    row = {"loss": math.nan, "grad": [math.inf, 1.5, -math.inf], "nested": {"x": math.nan}, "ok": 2}
    text = files.dumps(row)
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert back == {"loss": "nan", "grad": ["inf", 1.5, "-inf"], "nested": {"x": "nan"}, "ok": 2}
