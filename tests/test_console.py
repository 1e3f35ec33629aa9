"""Logs worth reading (train/console.py, the loop's metrics rows): plain lines when stderr is not a
terminal, the bar when it is, nothing but errors, warnings and the JSON with --quiet; metrics rows
with the gradient norm, elapsed seconds and memory; stages numbered from 1 everywhere."""
import io
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from steplm.train.checkpoint import list_steps
from steplm.train.console import Console, clock, growth_line, step_line

from conftest import ROOT, tiny_overrides


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A tiny STEP run (configs/tiny-step.yaml at conftest's tiny shape, 10 steps, an evaluation
    every 4) as a subprocess whose stderr is a file: (its stderr, metrics rows, summary, run folder)."""
    tmp = tmp_path_factory.mktemp("logged")
    out, log = tmp / "run", tmp / "stderr.txt"
    sets = tiny_overrides(tmp, **{"train.max_steps": 10, "train.eval_every": 4})
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    env.pop("STEPLM_FAULT", None)
    with open(log, "w") as f:
        res = subprocess.run([sys.executable, "-m", "steplm", "train", str(ROOT / "configs" / "tiny-step.yaml"),
                              "--out", str(out), *[x for kv in sets for x in ("--set", kv)]],
                             stdout=subprocess.PIPE, stderr=f, text=True, env=env, timeout=600)
    assert res.returncode == 0, log.read_text()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return log.read_text(), rows, json.loads((out / "summary.json").read_text()), out


def test_the_log_of_a_run_whose_stderr_is_a_file_has_evaluations_and_growth(logged):
    text, rows, summary, out = logged
    lines = text.splitlines()
    n1, n2 = summary["layers_per_stage"]
    total, first = sum(summary["stage_steps"]), summary["stage_steps"][0]
    growth = (f"step {first}/{total} | stage 2 of 2: {n1} -> {n1 + n2} layers ({n2} new; {n1} frozen with "
              f"rank-4 adapters)")  # tiny_overrides: lora.rank 4
    assert sum(line.startswith(growth) for line in lines) == 1, text
    vals = [r for r in rows if "val_loss" in r]
    assert len(vals) >= 3  # every 4 steps and at the end of each stage
    for r in vals:
        head = f"step {r['step']}/{total} | stage {r['stage']} of 2 | val loss {r['val_loss']:.4f} | val ppl "
        found = [line for line in lines if line.startswith(head)]
        assert len(found) == 1, (head, text)
        assert float(found[0][len(head):]) == pytest.approx(math.exp(r["val_loss"]), rel=1e-4)
    assert "\r" not in text and "tokenizing" not in text  # no bar in a file


def test_every_metrics_row_is_a_log_line(logged):
    text, rows, summary, out = logged
    lines = text.splitlines()
    total = sum(summary["stage_steps"])
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, total + 1))  # log_every 1
    for r in steps:
        head = (f"step {r['step']}/{total} | stage {r['stage']} of 2 | loss {r['loss']:.4f} | lr {r['lr']:.3e} | "
                f"grad norm {r['grad_norm']:.3g} | {r['tok_per_s']:,.0f} tok/s | elapsed {clock(r['elapsed_s'])}")
        assert sum(line.startswith(head) for line in lines) == 1, (head, text)
    for k in list_steps(out / "checkpoints"):  # the default (auto) checkpoints, said as they are written
        assert f"step {k}/{total} | checkpoint {out / 'checkpoints' / f'step_{k:08d}'}" in lines


def test_metrics_rows_have_grad_norm_elapsed_and_memory_and_stages_from_1(logged):
    text, rows, summary, out = logged
    steps = [r for r in rows if "loss" in r]
    assert all(isinstance(r["grad_norm"], float) and r["grad_norm"] > 0 for r in steps)
    elapsed = [r["elapsed_s"] for r in rows if "elapsed_s" in r]
    assert len(elapsed) == len(steps) + len([r for r in rows if "val_loss" in r])
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    assert all("memory" in r for r in steps)
    for stage in (1, 2):  # on the CPU: the MemTracker peak from the stage's measured (second) step on
        mem = [r["memory"] for r in steps if r["stage"] == stage]
        assert mem[0] is None and len(set(mem[1:])) == 1 and mem[1] > 0, mem
        record = summary["stages"][stage - 1]
        assert record["stage"] == stage and mem[1] == record["peak_bytes"]
    assert {r["stage"] for r in rows} == {1, 2}
    assert [r["stage"] for r in rows if "val_loss" in r][0] == 1


def test_quiet_prints_only_warnings_the_json_and_where_it_went(tmp_path, capsys):
    from steplm.cli import main
    sets = tiny_overrides(tmp_path, **{"train.max_steps": 3})
    argv = ["train", "--out", str(tmp_path / "run"), *[x for kv in sets for x in ("--set", kv)]]
    assert main([*argv, "--quiet"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["weights_sha256"]
    assert [line for line in cap.err.splitlines() if not line.startswith("steplm: warning:")] == \
        [f"run written to {tmp_path / 'run'}/ (summary.json, metrics.jsonl, model.safetensors)"]
    assert main([*argv[:2], str(tmp_path / "loud"), *argv[3:]]) == 0  # capsys' stderr is no terminal: lines
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" | ")[0] for line in err if " | loss " in line] == ["step 1/3", "step 2/3", "step 3/3"]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_bar_on_a_terminal_and_lines_elsewhere(monkeypatch):
    assert Console.pick(True, Terminal()) == "bar"
    assert Console.pick(True, io.StringIO()) == "lines"
    assert Console.pick(False, Terminal()) == "quiet"
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    console = Console(Console.pick(True), 4, 0)
    console.say("step 2/4 | stage 1 of 1 | val loss 5.0000 | val ppl 148.41")
    console.row({"step": 2, "stage": 1, "loss": 5.1, "tok_per_s": 1000.0}, "stage 1 of 1")
    console.advance()
    console.close()
    out = term.getvalue()
    assert "step 2/4 | stage 1 of 1 | val loss 5.0000 | val ppl 148.41\n" in out and "train:" in out, out
    assert " | loss " not in out  # the step rows go into the bar, not into lines


def _stage(**kw):
    base = dict(kind="grown", layers=6, new_layers=3, lora_rank=8, trainable_params=701184)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("prev,stage,text", [
    (_stage(kind="full", layers=3, new_layers=3, lora_rank=0), _stage(),
     "stage 2 of 2: 3 -> 6 layers (3 new; 3 frozen with rank-8 adapters), 701,184 trainable layer parameters"),
    (_stage(kind="full", layers=6, new_layers=6, lora_rank=0), _stage(kind="lora", new_layers=0, trainable_params=9),
     "stage 2 of 2: 6 layers (6 frozen with rank-8 adapters), 9 trainable layer parameters"),  # ReLoRA's switch
    (_stage(kind="full", layers=2, new_layers=2, lora_rank=0), _stage(layers=4, new_layers=2, lora_rank=0),
     "stage 2 of 2: 2 -> 4 layers (2 new; 2 frozen), 701,184 trainable layer parameters"),  # step-no-pet
])
def test_growth_line(prev, stage, text):
    assert growth_line(prev, stage, "stage 2 of 2") == text


def test_a_step_line_shows_non_finite_values_and_the_skipped_count():
    row = {"step": 7, "loss": "nan", "lr": 3e-3, "grad_norm": "inf", "tok_per_s": 1234.5, "elapsed_s": 3725.2,
           "memory": 3 * 2**30, "skipped": 2}
    assert step_line(row, 20, "stage 1 of 1") == ("step 7/20 | stage 1 of 1 | loss nan | lr 3.000e-03 | "
                                                  "grad norm inf | 1,234 tok/s | elapsed 1:02:05 | peak 3.00 GiB | "
                                                  "skipped 2")


def test_grad_norm_is_the_norm_before_clipping(tmp_path):
    """The same first step with clipping off and at 1e-3, with either AdamW kernel (the fused one clips
    inside the optimizer), reports one norm: the total gradient norm before clipping, that of the
    gradients the step leaves when nothing clips them."""
    import torch

    from steplm import config
    from steplm.train.loop import Trainer

    norms = []
    for clip in (0.0, 1e-3):
        for fused in (False, True):
            sets = {"train.grad_clip": clip, "train.fused_optimizer": fused}
            cfg = config.load(None, tiny_overrides(tmp_path, **sets))
            t = Trainer(cfg, tmp_path / f"run{clip}{fused}", progress=False)
            t.train_step()
            grads = [p.grad for p in t.model.parameters() if p.grad is not None]
            left = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
            if not clip:
                assert t.grad_norm == pytest.approx(left, rel=1e-5)
            norms.append(t.grad_norm)
    assert norms[0] > 100 * 1e-3 and norms == pytest.approx([norms[0]] * 4, rel=1e-6)


def test_an_old_checkpoint_numbered_from_0_is_renumbered(tmp_path):
    """Stage records and metrics rows written before stages were numbered from 1 are renumbered on
    resume; rows past the checkpoint's length go (a resume cuts them anyway)."""
    from steplm.train.state import renumber_stages

    kept = ['{"step": 1, "stage": 0, "loss": 5.0}\n', '{"step": 2, "stage": 1, "merge_kept_share": 1.0}\n',
            '{"step": 2, "stage": 1, "val_loss": 4.0}\n']
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(kept) + '{"step": 3, "stage": 1, "loss": 3.0}\n')
    state = {"stage_records": [{"stage": 0}, {"stage": 1}], "record": {"stage": 2},
             "metrics_bytes": len("".join(kept))}
    renumber_stages(state, metrics)
    assert [r["stage"] for r in state["stage_records"]] == [1, 2] and state["record"]["stage"] == 3
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [(r["step"], r["stage"]) for r in rows] == [(1, 1), (2, 2), (2, 2)]
    assert rows[0]["loss"] == 5.0 and state["metrics_bytes"] == len(metrics.read_bytes())


def test_elapsed_goes_on_from_the_checkpoints_count(tmp_path):
    """A resumed run starts its clock at the seconds its checkpoint recorded (here 1000, as if a
    resume had loaded them), and its checkpoints record the clock in turn."""
    import torch

    from steplm import config
    from steplm.train.loop import Trainer

    t = Trainer(config.load(None, tiny_overrides(tmp_path, **{"train.max_steps": 4})), tmp_path / "run", progress=False)
    t.state.elapsed_seconds = 1000.0
    t.fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in rows]
    assert 1000 < elapsed[0] and elapsed == sorted(elapsed)
    last = tmp_path / "run" / "checkpoints" / f"step_{4:08d}" / "trainer.pt"
    # the rows round to milliseconds (up, at most by half of one); the checkpoint keeps the exact clock
    assert torch.load(last, weights_only=False)["elapsed_seconds"] >= elapsed[-1] - 0.0005
