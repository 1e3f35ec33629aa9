"""SFT on the shared training loop: response-token normalisation across micro-batches, bitwise
resume after a SIGKILL, checkpoints, the NaN guard and bad input."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from steplm.train.checkpoint import list_steps
from steplm.cli import main
from steplm.errors import EXIT_PREEMPTED
from steplm.train.sft import IGNORE, accumulate_response_loss

from conftest import ROOT, shared, torchrun_args


def _model():
    from steplm.model.llama import ModelConfig, build_model
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=40, init_std=0.2)
    return build_model(cfg, seed=0).train()


# Four examples with 3, 1, 7 and 2 response targets (labels after the first position).
BATCH = [([1, 2, 3, 4, 5, 6], [IGNORE, IGNORE, IGNORE, 4, 5, 6]),
         ([7, 8, 9], [IGNORE, IGNORE, 9]),
         ([3, 1, 4, 1, 5, 9, 2, 6], [IGNORE, 1, 4, 1, 5, 9, 2, 6]),
         ([2, 7, 1, 8], [IGNORE, IGNORE, 1, 8])]


def _reference(model):
    """The one-piece loss computed independently: every example's response targets summed, / 13."""
    total, n = 0.0, 0
    for ids, labels in BATCH:
        logits = model(torch.tensor([ids]))[0, :-1]
        y = torch.tensor(labels[1:])
        total = total + F.cross_entropy(logits, y, ignore_index=IGNORE, reduction="sum")
        n += int((y != IGNORE).sum())
    assert n == 13
    return total / n


@pytest.mark.parametrize("fused", [True, False])
def test_accumulated_sft_loss_equals_one_batch(fused):
    """Micro-batches of unequal response counts: normalising by the step's response tokens (not a mean of
    micro-batch means) gives the one-piece loss and gradients, for the fused and the unfused loss."""
    model = _model()

    def loss_fn(x, y):
        if fused:
            return model(x, targets=y)
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=IGNORE)

    model.zero_grad(set_to_none=True)
    ref = _reference(model)
    ref.backward()
    g_ref = [p.grad.clone() for p in model.parameters()]
    for split in ([BATCH], [BATCH[:1], BATCH[1:3], BATCH[3:]], [[b] for b in BATCH]):
        model.zero_grad(set_to_none=True)
        loss = accumulate_response_loss(loss_fn, split, 0, torch.device("cpu"), n_response=13)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
        for a, b in zip(g_ref, [p.grad for p in model.parameters()]):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)
    # the mean of per-example means differs here, so the test tells the two normalisations apart
    per_example = [accumulate_response_loss(loss_fn, [[b]], 0, torch.device("cpu"), n_response=n).item()
                   for b, n in zip(BATCH, (3, 1, 7, 2))]
    assert abs(sum(per_example) / 4 - ref.item()) > 1e-3


def _sft_args(run_dir, out, *extra):
    return ["sft", str(run_dir), "--data", str(shared("alpaca/seed_tasks.jsonl")), "--out", str(out),
            "--limit", "12", "--epochs", "2", "--lr", "3e-3", "--warmup-steps", "2", "--batch-size", "4",
            "--micro-batch", "2", "--checkpoint-every", "1", "--quiet", "--dtype", "fp32", *extra]


def _run(args, fault=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    env.pop("STEPLM_FAULT", None)
    if fault:
        env["STEPLM_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "steplm", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.slow
def test_sft_resumes_bitwise_after_sigkill(tiny_run, tmp_path):
    ref = tmp_path / "ref"
    done = _run(_sft_args(tiny_run, ref))
    assert done.returncode == 0, done.stderr
    want = json.loads((ref / "sft_summary.json").read_text())
    assert want["steps"] == 6  # 12 examples / 4 per step, 2 epochs
    out = tmp_path / "run"
    for step in (2, 4):  # inside the first epoch, and inside the second
        killed = _run(_sft_args(tiny_run, out), fault=f"kill_after_step:{step}")
        assert killed.returncode == -signal.SIGKILL
    assert not (out / "sft_summary.json").exists()
    # a SIGTERM between step 6's two micro-batches, periodic checkpoints off: the preemption writes
    # checkpoint 5 itself, with the examples rewound to step 6's start
    args = _sft_args(tiny_run, out)
    args[args.index("--checkpoint-every") + 1] = "0"
    stopped = _run(args, fault="sigterm_mid_step:6")
    assert stopped.returncode == EXIT_PREEMPTED and "after step 5:" in stopped.stderr, stopped.stderr
    assert list_steps(out / "checkpoints")[-1] == 5
    resumed = _run(_sft_args(tiny_run, out))
    assert resumed.returncode == 0, resumed.stderr
    got = json.loads((out / "sft_summary.json").read_text())
    assert got["weights_sha256"] == want["weights_sha256"]
    assert got["losses"] == want["losses"] and len(got["losses"]) == 6
    # the result is a model directory the other commands read
    assert main(["generate", str(out), "--prompt", "Give me a fact.", "--alpaca", "--max-new-tokens", "3"]) == 0


def test_sft_accumulation_matches_one_batch_end_to_end(tiny_run, tmp_path, capsys):
    """The same run with 4 examples per forward and with 1 per forward (4 accumulated): same losses."""
    res = {}
    for micro in ("4", "1"):
        args = _sft_args(tiny_run, tmp_path / micro)
        args[args.index("--micro-batch") + 1] = micro
        assert main(args) == 0
        res[micro] = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert res["1"]["first_loss"] == pytest.approx(res["4"]["first_loss"], rel=1e-5)
    assert res["1"]["final_loss"] == pytest.approx(res["4"]["final_loss"], rel=1e-3)
    metrics = [json.loads(x) for x in (tmp_path / "1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if "loss" in r] == [1, 2, 3, 4, 5, 6]  # one row per step


@pytest.mark.parametrize("extra,needle", [
    (["--batch-size", "5"], "--batch-size"),  # not a multiple of --micro-batch 2
    (["--device", "cuda"], "--device"),
    (["--set", "train.lr=-1"], "train.lr"),
])
def test_sft_bad_flags_one_line(tiny_run, tmp_path, capsys, extra, needle):
    if needle == "--device" and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    out = tmp_path / "o"
    assert main(_sft_args(tiny_run, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_sft_refuses_a_foreign_non_empty_out(tiny_run, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(_sft_args(tiny_run, out)) == 2
    assert "--out" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("kind", ["file", "link to a file"])
def test_sft_refuses_an_out_that_is_not_a_directory(tiny_run, tmp_path, capsys, kind):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    out = target if kind == "file" else tmp_path / "link"
    if kind != "file":
        out.symlink_to(target)
    assert main(_sft_args(tiny_run, out)) == 2
    err = capsys.readouterr().err.strip()
    assert "--out" in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert target.read_text() == "mine"


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_sft_under_torchrun_matches_one_process(tiny_run, tmp_path, parallel):
    """2 processes × 1 micro-batch of 2 examples end with the weights of one process × 2 accumulated
    micro-batches of 2 (the same global batch of 4), within 4× the summation-order noise floor that one
    process with a single micro-batch of 4 shows."""
    from safetensors.torch import load_file

    def sft(out, micro, nproc=1, *extra):
        args = _sft_args(tiny_run, out, "--set", "train.fused_optimizer=false", *extra)
        args[args.index("--micro-batch") + 1] = str(micro)
        args = [*(torchrun_args(nproc) if nproc > 1 else []), "-m", "steplm", *args]
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
        env.pop("STEPLM_FAULT", None)
        res = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        return load_file(str(out / "model.safetensors"))

    def max_diff(a, b):
        assert a.keys() == b.keys()
        return max((a[k] - b[k]).abs().max().item() for k in a)

    one = sft(tmp_path / "one", 4)
    accum = sft(tmp_path / "accum", 2)
    multi = sft(tmp_path / "multi", 2, 2, "--set", f"train.parallel={parallel}")
    floor = max_diff(one, accum)
    assert floor < 1e-3
    assert max_diff(accum, multi) <= max(1e-5, 4 * floor)
    summary = json.loads((tmp_path / "multi" / "sft_summary.json").read_text())
    assert summary["batch_examples"] == 4 and summary["steps"] == 6


@pytest.mark.parametrize("extra", [[], ["--set", "train.on_nonfinite=skip", "--set", "train.max_skipped=0"]])
def test_sft_divergence_names_the_sft_flag(tiny_run, tmp_path, capsys, extra):
    """An SFT run that diverges stops with exit 3 and tells the user to lower --lr, the flag SFT has
    (not train.lr, the pre-training key), whichever guard catches it."""
    args = _sft_args(tiny_run, tmp_path / "o", *extra)
    args[args.index("--lr") + 1] = "1e30"
    assert main(args) == 3
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "warning" not in ln]  # dropped examples
    assert len(lines) == 1 and "lower --lr" in lines[0] and "train.lr" not in lines[0], lines


@pytest.mark.parametrize("steps", [1, 9, 10])
def test_sft_warmup_is_at_most_a_tenth_of_the_run(tiny_run, tmp_path, capsys, steps):
    """--warmup-steps is capped at steps // 10 (0 under ten steps: the same schedule as 1, the peak
    first), so an SFT run always decays and is never told about train.warmup_steps, a key it lacks."""
    out = tmp_path / "o"
    assert main(["sft", str(tiny_run), "--data", str(shared("alpaca/seed_tasks.jsonl")), "--out", str(out),
                 "--limit", "1", "--epochs", str(steps), "--batch-size", "1", "--quiet", "--dtype", "fp32"]) == 0
    summary = json.loads((out / "sft_summary.json").read_text())  # one example per step, one step per epoch
    assert summary["steps"] == steps and summary["warmup_steps"] == min(100, steps // 10)
    assert "train.warmup_steps" not in capsys.readouterr().err


def test_examples_without_a_response_are_dropped_and_counted(tiny_run, tmp_path, capsys):
    """Blank outputs (only EOS to learn) and responses that max_seq_len cuts off entirely are not
    tuned on, and one warning says how many of each were dropped: no example is ignored silently."""
    from steplm.io.run_dir import load_model_dir
    max_len = load_model_dir(tiny_run).config.max_seq_len
    long_instruction = " ".join(["word"] * (4 * max_len))  # the prompt alone fills the context
    records = ([{"instruction": f"Say {i}.", "input": None if i % 2 else "", "output": f"number {i}"}
                for i in range(5)]  # null: how pandas and datasets write a missing input
               + [{"instruction": "Say nothing.", "input": None, "output": out} for out in ("", "  \n", None)]
               + [{"instruction": long_instruction, "input": "", "output": "too late"}])
    data = tmp_path / "d.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "sft"
    assert main(["sft", str(tiny_run), "--data", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "1",
                 "--warmup-steps", "0", "--quiet", "--dtype", "fp32"]) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning: tuning on" in ln]
    assert len(warnings) == 1 and "tuning on 5 of 9 examples" in warnings[0], warnings
    assert "3 have an empty output, 1 a response cut off" in warnings[0], warnings
    assert "0 of the 5 are cut short" in warnings[0], warnings  # "number i" and EOS fit in the context
    assert json.loads((out / "sft_summary.json").read_text())["examples"] == 5


def test_responses_cut_short_are_counted(tiny_run, tmp_path, capsys):
    """A response longer than the context left after its prompt is tuned on without its end and EOS:
    the warning counts it, and the count matches the examples' own token lengths."""
    from steplm.io.run_dir import load_model_dir
    from steplm.eval.generate import alpaca_prompt
    m = load_model_dir(tiny_run)
    long_output = " ".join(["word"] * m.config.max_seq_len)
    records = [{"instruction": "Say it.", "input": "", "output": out} for out in ("short", long_output, long_output)]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(records))
    n_long = sum(len(m.tokenizer.encode(alpaca_prompt(r["instruction"], "")).ids)
                 + len(m.tokenizer.encode(r["output"], add_special_tokens=False).ids) + 1 > m.config.max_seq_len
                 for r in records)
    assert main(["sft", str(tiny_run), "--data", str(data), "--out", str(tmp_path / "o"), "--epochs", "1",
                 "--batch-size", "1", "--warmup-steps", "0", "--quiet", "--dtype", "fp32"]) == 0
    # (a 3-example run may also be told it learned nothing: that warning has its own tests)
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning: tuning on" in ln]
    assert n_long == 2 and len(warnings) == 1 and "tuning on 3 of 3" in warnings[0], warnings
    assert f"{n_long} of the 3 are cut short" in warnings[0], warnings


def test_sft_counts_the_tokens_it_trains_on(tiny_run, tmp_path, capsys):
    """tokens_seen (and the FLOPs made from it) is the examples' real length, prompt + response + EOS,
    summed over the epochs: not max_seq_len per example, which padding never fills."""
    from steplm.io.run_dir import load_model_dir
    from steplm.eval.generate import alpaca_prompt
    m = load_model_dir(tiny_run)
    records = [{"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i)))}
               for i in range(1, 7)]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(records))
    lengths = [min(m.config.max_seq_len, len(m.tokenizer.encode(alpaca_prompt(r["instruction"], "")).ids)
                   + len(m.tokenizer.encode(r["output"], add_special_tokens=False).ids) + 1) for r in records]
    out = tmp_path / "o"
    assert main(["sft", str(tiny_run), "--data", str(data), "--out", str(out), "--epochs", "2", "--batch-size", "2",
                 "--warmup-steps", "0", "--dtype", "fp32"]) == 0  # not --quiet: the run's data line is shown
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens_seen"] == 2 * sum(lengths) < 2 * len(records) * m.config.max_seq_len, summary
    response = sum(len(m.tokenizer.encode(r["output"], add_special_tokens=False).ids) + 1 for r in records)
    assert f"steplm: data: {data}: {len(records)} examples tuned on, {sum(lengths):,} tokens ({response:,} response " \
           "tokens, which the loss is on); validation: none held out" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tuned_step_run(step_run, tmp_path_factory):
    """`steplm sft` of the tiny STEP run."""
    tmp = tmp_path_factory.mktemp("tuned")
    data = tmp / "d.json"
    data.write_text(json.dumps([{"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i)))}
                                for i in range(1, 7)]))
    out = tmp / "sft"
    assert main(["sft", str(step_run), "--data", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "2",
                 "--warmup-steps", "0", "--quiet", "--dtype", "fp32"]) == 0
    return out


def test_sft_keeps_the_pretraining_history(step_run, tuned_step_run, tmp_path, capsys):
    """After sft of a STEP run, summary.json, info and the exported config.json still say how the
    model was pre-trained (method step, 2 -> 4 layers, its tokens), where it came from, and the tuning."""
    pre = json.loads((step_run / "summary.json").read_text())
    s = json.loads((tuned_step_run / "summary.json").read_text())
    expect = {"method": "step", "layers_per_stage": [2, 2], "stage_steps": pre["stage_steps"],
              "tokens_seen": pre["tokens_seen"], "final_val_loss": pre["final_val_loss"], "source": str(step_run)}
    assert s["pretraining"] == expect
    assert s["method"] == "vanilla" and s["layers_per_stage"] == [4]  # what the tuning itself did
    capsys.readouterr()
    assert main(["info", str(tuned_step_run), "--json"]) == 0
    h = json.loads(capsys.readouterr().out)["steplm"]
    assert {k: h[k] for k in expect} == expect
    assert h["sft"]["examples"] == 6 and h["sft"]["steps"] == 3 and h["sft"]["epochs"] == 1
    assert main(["info", str(tuned_step_run)]) == 0
    text = capsys.readouterr().out
    assert "stages:" in text and "2 -> 4 layers" in text and f"{pre['tokens_seen']:,}" in text
    assert main(["export", str(tuned_step_run), "--to", str(tmp_path / "hf")]) == 0
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())["steplm"]
    assert {k: exported[k] for k in expect} == expect and exported["sft"] == h["sft"]
    # and a pre-training export carries its history the same way, without "sft"
    assert main(["export", str(step_run), "--to", str(tmp_path / "hf_pre")]) == 0
    plain = json.loads((tmp_path / "hf_pre" / "config.json").read_text())["steplm"]
    assert {k: plain[k] for k in expect if k != "source"} == {k: v for k, v in expect.items() if k != "source"}
    assert "sft" not in plain


def test_sft_calls_its_loss_on_training_examples_a_train_loss(tuned_step_run):
    """SFT holds no examples out: its evaluation is on training examples, and nothing calls it validation."""
    s = json.loads((tuned_step_run / "summary.json").read_text())
    assert "final_val_loss" not in s and "final_val_ppl" not in s
    assert s["final_train_ppl"] == pytest.approx(math.exp(s["final_train_loss"]))
    assert all("val_loss" not in r and "train_loss" in r for r in s["stages"])
    rows = [json.loads(x) for x in (tuned_step_run / "metrics.jsonl").read_text().splitlines()]
    assert not any("val_loss" in r for r in rows)
    assert [r["train_loss"] for r in rows if "train_loss" in r] == [round(s["final_train_loss"], 5)]
    sft = json.loads((tuned_step_run / "sft_summary.json").read_text())
    assert sft["final_train_loss"] == s["final_train_loss"]


def test_an_sft_run_of_an_sft_run_keeps_the_first_history(step_run, tuned_step_run, tmp_path):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "Say yes.", "input": "", "output": "yes"}] * 2))
    out = tmp_path / "again"
    assert main(["sft", str(tuned_step_run), "--data", str(data), "--out", str(out), "--epochs", "1",
                 "--batch-size", "2", "--warmup-steps", "0", "--quiet"]) == 0
    pre = json.loads((out / "summary.json").read_text())["pretraining"]
    assert pre["method"] == "step" and pre["layers_per_stage"] == [2, 2] and pre["source"] == str(tuned_step_run)


def test_an_sft_run_written_before_history_travelled_is_not_called_vanilla(tuned_step_run, tmp_path):
    """An SFT run of an older steplm: summary.json has the tuning's own method and final_val_loss and
    no "pretraining". The history says what is known (the tuning) and claims no pre-training method."""
    from steplm.io.run_dir import run_history

    old = tmp_path / "old"
    shutil.copytree(tuned_step_run, old)
    s = json.loads((old / "summary.json").read_text())
    s.pop("pretraining")
    s["final_val_loss"] = s.pop("final_train_loss")
    (old / "summary.json").write_text(json.dumps(s))
    h = run_history(old)
    assert "method" not in h and "layers_per_stage" not in h and h["sft"]["examples"] == 6
