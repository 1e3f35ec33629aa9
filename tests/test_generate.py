"""Generation (KV cache vs full recompute, sampling filters), SFT masking, MT-Bench answer files."""
import json

import pytest
import torch

from steplm.cli import main
from steplm.io.run_dir import load_model
from steplm.eval.generate import alpaca_prompt, generate, sample_next
from steplm.train.sft import IGNORE, build_example, read_examples

from conftest import shared


def test_greedy_generation_matches_full_recompute(tiny_run):
    model, tok = load_model(tiny_run)
    prompt = tok.encode("ROMEO:\nWhat", add_special_tokens=False).ids
    got = generate(model, prompt, max_new_tokens=12, eos=None)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[len(prompt):]


def test_stops_at_eos(tiny_run):
    model, tok = load_model(tiny_run)
    prompt = tok.encode("Hello", add_special_tokens=False).ids
    first = generate(model, prompt, max_new_tokens=1)[0]
    assert generate(model, prompt, max_new_tokens=10, eos=first) == []


def test_sampling_filters():
    logits = torch.tensor([0.0, 5.0, 4.9, -1.0])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, 0.0, None, None, g) == 1
    assert {sample_next(logits, 1.0, 2, None, g) for _ in range(200)} == {1, 2}  # top-k keeps two
    assert {sample_next(logits, 1.0, None, 0.3, g) for _ in range(100)} == {1}  # top-p: 1 already has > 0.3
    assert len({sample_next(logits, 5.0, None, None, g) for _ in range(400)}) == 4


@pytest.mark.parametrize("temperature", [1e-30, 1e-45, 1e-300, 5e-324])
def test_a_tiny_temperature_samples_the_argmax(temperature):
    """Temperatures whose inverse overflows fp32 (or even fp64) still give a distribution: the
    largest logit, as greedy decoding would pick, with and without top-k/top-p."""
    g = torch.Generator().manual_seed(0)
    for logits in (torch.tensor([0.5, 3.0, -2.0, 2.9]), 30 * torch.randn(512, generator=g)):
        best = int(logits.argmax())
        for top_k, top_p in ((None, None), (5, None), (None, 0.9)):
            assert {sample_next(logits, temperature, top_k, top_p, g) for _ in range(5)} == {best}


def test_sft_masks_prompt_tokens(tiny_run):
    _, tok = load_model(tiny_run)
    ex = {"instruction": "Say hi.", "input": "", "output": "hi there"}
    ids, labels = build_example(tok, ex, eos=0, max_len=1000)
    n_prompt = len(tok.encode(alpaca_prompt("Say hi."), add_special_tokens=False).ids)
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and labels[-1] == 0


def test_read_both_formats():
    alpaca = read_examples(shared("eval/alpaca/alpaca_200.json"))
    seeds = read_examples(shared("alpaca/seed_tasks.jsonl"))
    assert len(alpaca) == 200 and set(alpaca[0]) == {"instruction", "input", "output"}
    assert len(seeds) >= 175 and all(isinstance(e["output"], str) for e in seeds)


def test_sft_cli_learns_responses(tiny_run, tmp_path, capsys):
    out = tmp_path / "sft"
    assert main(["sft", str(tiny_run), "--data", str(shared("alpaca/seed_tasks.jsonl")), "--out", str(out),
                 "--limit", "8", "--epochs", "6", "--lr", "3e-3", "--warmup-steps", "2", "--batch-size", "4",
                 "--quiet"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["steps"] == 12 and s["final_loss"] < s["first_loss"]
    # the result is a model directory the other commands accept
    assert main(["generate", str(out), "--prompt", "Give me a fact.", "--alpaca", "--max-new-tokens", "5"]) == 0


def test_mt_bench_answer_file(tiny_run, tmp_path):
    out = tmp_path / "answers.jsonl"
    assert main(["mt-bench", str(tiny_run), "--questions", str(shared("eval/mt_bench/question.jsonl")),
                 "--out", str(out), "--limit", "3", "--max-new-tokens", "4", "--model-id", "tiny"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [81, 82, 83]
    for r in rows:
        assert r["model_id"] == "tiny" and len(r["choices"]) == 1 and len(r["choices"][0]["turns"]) == 2
        assert set(r) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}


@pytest.mark.parametrize("args,needle", [
    (["generate", "{run}", "--prompt", ""], "--prompt"),
    (["generate", "{run}", "--prompt", "x", "--top-p", "1.5"], "--top-p"),
    (["generate", "{run}", "--prompt", "x", "--temperature", "-1"], "--temperature"),
    (["sft", "{run}", "--data", "{tmp}/none.json", "--out", "{tmp}/o"], "--data"),
    (["sft", "{run}", "--data", "{tmp}/bad.json", "--out", "{tmp}/o"], "instruction"),
    (["mt-bench", "{run}", "--questions", "{tmp}/bad.json", "--out", "{tmp}/a.jsonl"], "--questions"),
])
def test_bad_input(tiny_run, tmp_path, capsys, args, needle):
    (tmp_path / "bad.json").write_text('[{"text": "no instruction"}]')
    assert main([a.format(run=tiny_run, tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists() and not (tmp_path / "a.jsonl").exists()


def _context_sensitive_model():
    """A random GQA model whose greedy output depends strongly on the prompt (a 12-step run's does not)."""
    from steplm.model.llama import ModelConfig, build_model
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=40, init_std=0.2)
    return build_model(cfg, seed=0).eval()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_batched_generation_matches_one_at_a_time(temperature):
    from steplm.eval.generate import generate_batch, generate_many

    model = _context_sensitive_model()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (6, 1, 17, 3, 11)]  # real left padding
    kw = {"max_new_tokens": 8, "temperature": temperature, "top_k": 20, "seed": 3}
    one = [generate(model, p, eos=None, **kw) for p in prompts]
    assert len({tuple(o) for o in one}) == len(one)  # the prompts lead to different outputs
    assert generate_batch(model, prompts, eos=None, **kw) == one
    assert generate_many(model, prompts, batch_size=2, eos=None, **kw) == one
    # rows stopping early at an EOS leave the others unchanged
    eos = next(t for o in one for t in o if len({len(x[:x.index(t)] if t in x else x) for x in one}) > 2)
    want = [o[:o.index(eos)] if eos in o else o for o in one]
    assert generate_batch(model, prompts, eos=eos, **kw) == want
    # and so does a row that reaches max_seq_len (40) after 3 new tokens
    near_end = [prompts[2] * 2 + [5, 6, 7], prompts[1], prompts[3]]
    assert len(near_end[0]) == 37
    got = generate_batch(model, near_end, eos=None, **kw)
    assert len(got[0]) == 3 and got == [generate(model, p, eos=None, **kw) for p in near_end]


def test_left_padded_logits_match_unpadded():
    model = _context_sensitive_model()
    a = [5, 9, 33, 2, 17, 40, 8]
    b = a[:3]
    x = torch.tensor([a, [0] * (len(a) - 3) + b])
    valid = torch.ones(x.shape, dtype=torch.bool)
    valid[1, :len(a) - 3] = False
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        got = model(x, attention_mask=valid, position_ids=pos)
        ref_a, ref_b = model(torch.tensor([a]))[0], model(torch.tensor([b]))[0]
    torch.testing.assert_close(got[0], ref_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, len(a) - 3:], ref_b, atol=1e-5, rtol=1e-5)
    # padding keys are really masked: unmasked, they change row 1
    with torch.no_grad():
        leaky = model(x, attention_mask=torch.ones_like(valid), position_ids=pos)
    assert not torch.allclose(leaky[1, len(a) - 3:], ref_b, atol=1e-3)


def test_sft_batches_resume_from_state_dict():
    from steplm.train.sft import SFTBatches

    data = [([i, i + 1], [IGNORE, i + 1]) for i in range(7)]
    a = SFTBatches(data, 3, seed=5)
    seen = [a.next() for _ in range(4)]  # 3 batches per epoch: crosses into epoch 1
    assert a.batches_per_epoch == 3 and [len(b) for b in seen] == [3, 3, 1, 3]
    assert sorted(x for b in seen[:3] for x in b) == data  # an epoch is a permutation
    assert seen[:3] != [data[0:3], data[3:6], data[6:]]  # shuffled
    b = SFTBatches(data, 3, seed=5)
    b.load_state_dict(a.state_dict())
    assert [b.next() for _ in range(5)] == [a.next() for _ in range(5)]


@pytest.mark.parametrize("lengths,max_new", [([300], 5), ([10], 1000), ([300, 10, 2], 50), ([4, 3], 10)])
def test_context_warnings_say_what_generation_cuts(tiny_run, capsys, lengths, max_new):
    """A prompt past the context is cut to its last max_seq_len-1 tokens and --max-new-tokens is
    capped so that prompt and answer fit: each is said in one warning line, whose numbers are those
    of the tokens generate_batch actually produces (greedy, no EOS, so every row uses its budget)."""
    import re

    from steplm.eval.generate import generate_batch, warn_context

    model, _ = load_model(tiny_run)
    limit = model.config.max_seq_len
    prompts = [[7] * n for n in lengths]
    warn_context(prompts, max_new, limit)
    err = capsys.readouterr().err.strip().splitlines()
    out = generate_batch(model, prompts, max_new)
    used = [min(n, limit - 1) for n in lengths]
    cut = [n for n in lengths if n > limit - 1]
    capped = [len(o) for o in out if len(o) < max_new]
    assert [len(o) for o in out] == [min(max_new, limit - u) for u in used]  # the rule the warnings describe
    assert len(err) == bool(cut) + bool(capped), err
    if cut:
        assert f"only the last {limit - 1} tokens" in err[0] and str(max(cut)) in err[0]
    if capped:
        assert int(re.search(r"(\d+) new tokens", err[-1]).group(1)) == min(capped)
        assert f"--max-new-tokens {max_new}" in err[-1]


def test_generate_cli_warns_once_for_a_long_prompt(tiny_run, capsys):
    assert main(["generate", str(tiny_run), "--prompt", "To be, or not to be " * 200, "--max-new-tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert err.count("steplm: warning:") == 2 and "exceeds the model's context" in err and "Traceback" not in err


def test_mt_bench_warns_about_sampling_flags_under_greedy_and_creates_its_folder(tiny_run, tmp_path, capsys):
    """The answers' folder is created, as train's and export's are; --top-k at temperature 0 is one
    warning, and the answers are the greedy ones."""
    answers = {}
    for name, extra in (("plain", []), ("topk", ["--top-k", "3"])):
        out = tmp_path / name / "new" / "answers.jsonl"
        assert main(["mt-bench", str(tiny_run), "--questions", str(shared("eval/mt_bench/question.jsonl")),
                     "--out", str(out), "--limit", "2", "--max-new-tokens", "3", *extra]) == 0
        err = capsys.readouterr().err
        assert ("steplm: warning: --top-k has no effect under greedy decoding" in err) == bool(extra), err
        answers[name] = [r["choices"] for r in map(json.loads, out.read_text().splitlines())]
    assert answers["plain"] == answers["topk"]


def test_a_failed_mt_bench_leaves_no_folder_it_created(tiny_run, tmp_path, capsys):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1}\n')
    out = tmp_path / "a" / "b" / "x.jsonl"
    assert main(["mt-bench", str(tiny_run), "--questions", str(bad), "--out", str(out)]) == 2
    assert "--questions" in capsys.readouterr().err and not (tmp_path / "a").exists()
