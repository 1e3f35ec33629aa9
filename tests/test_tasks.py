"""Zero-shot tasks: loaders, lm-eval's encoding, batched scoring against brute force, metrics."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from steplm.eval import tasks
from steplm.cli import main
from steplm.io.run_dir import load_model

from conftest import shared


@pytest.fixture(scope="module")
def eval_dir():
    return shared("eval")


def test_loaders(eval_dir):
    expected_choices = {"piqa": 2, "arc_easy": None, "arc_challenge": None, "winogrande": 2, "openbookqa": 4,
                        "hellaswag": 4, "lambada": 1}
    for name, k in expected_choices.items():
        docs = tasks.load_task(name, eval_dir, limit=20)
        assert len(docs) == 20
        for d in docs:
            assert 0 <= d.gold < len(d.requests) == len(d.choices)
            if k:
                assert len(d.requests) == k
    assert len(tasks.load_task("piqa", eval_dir)) == 1838 and len(tasks.load_task("winogrande", eval_dir)) == 1267
    assert len(tasks.load_task("hellaswag", eval_dir)) == 10042 and len(tasks.load_task("lambada", eval_dir)) == 5153


def test_prompt_formats(eval_dir):
    piqa = tasks.load_task("piqa", eval_dir, 1)[0]
    assert piqa.requests[0][0].startswith("Question: How do I ready a guinea pig cage") and \
        piqa.requests[0][0].endswith("\nAnswer:") and piqa.requests[0][1].startswith(" Provide")
    wg = tasks.load_task("winogrande", eval_dir, 1)[0]
    assert wg.requests[0][0] == "Sarah was a much better surgeon than Maria so Sarah"
    assert wg.requests[1][0].endswith("so Maria") and wg.requests[0][1] == " always got the easier cases."
    assert wg.gold == 1
    lam = tasks.load_task("lambada", eval_dir, 1)[0]
    ctx, cont = lam.requests[0]
    assert cont.startswith(" ") and " " not in cont[1:] and ctx + cont == json.loads(
        (eval_dir / "lambada" / "lambada_test.jsonl").read_text().splitlines()[0])["text"]


def test_encode_pair_moves_trailing_spaces():
    def enc(s):
        return [ord(c) for c in s]
    ctx, cont = tasks.encode_pair(enc, "Answer: ", "yes", prefix=0)
    assert ctx == enc("Answer:") and cont == enc(" yes")
    assert tasks.encode_pair(enc, "", "hi", prefix=7) == ([7], enc("hi"))


def test_batched_scores_match_unbatched_brute_force(tiny_run):
    model, tok = load_model(tiny_run)
    reqs = [("To be, or not", " to be"), ("Hello", " world and more words here"), ("A", " b"),
            ("First Citizen:\nBefore we proceed any further, hear", " me speak.")]

    def enc(s):
        return tok.encode(s, add_special_tokens=False).ids
    got = tasks.loglikelihoods(model, enc, 0, reqs, batch_size=3)
    for (ctx, cont), (ll, greedy) in zip(reqs, got):
        c, k = tasks.encode_pair(enc, ctx, cont, 0)
        x = torch.tensor([c + k])
        with torch.no_grad():
            logp = F.log_softmax(model(x)[0, :-1].float(), -1)
        want = sum(logp[len(c) - 1 + j, t].item() for j, t in enumerate(k))
        assert ll == pytest.approx(want, abs=1e-4)
        assert greedy == all(logp[len(c) - 1 + j].argmax().item() == t for j, t in enumerate(k))


def test_metric_definitions(monkeypatch, eval_dir):
    # Two choices: raw log-likelihood prefers the short choice 0, per-character normalisation the long choice 1.
    monkeypatch.setattr(tasks, "load_task", lambda name, d, limit=None: [
        tasks.Doc([("q", " b"), ("q", " aaaaaaaaaa")], 1, ["b", "aaaaaaaaaa"])])
    monkeypatch.setattr(tasks, "loglikelihoods", lambda *a, **k: [(-3.0, False), (-3.5, False)])

    class Tok:
        def token_to_id(self, s):
            return 0
    res = tasks.evaluate_tasks(None, Tok(), ["piqa"], eval_dir)["tasks"]["piqa"]
    assert res == {"acc": 0.0, "acc_norm": 1.0, "n": 1}
    monkeypatch.setattr(tasks, "load_task", lambda name, d, limit=None: [
        tasks.Doc([("c", " w")], 0, ["w"]), tasks.Doc([("c", " v")], 0, ["v"])])
    monkeypatch.setattr(tasks, "loglikelihoods", lambda *a, **k: [(-1.0, True), (-3.0, False)])
    lam = tasks.evaluate_tasks(None, Tok(), ["lambada"], eval_dir)["tasks"]["lambada"]
    assert lam["acc"] == 0.5 and lam["ppl"] == pytest.approx(math.exp(2.0))


def test_cli_tasks_on_run_and_export_identical(tiny_run, tmp_path, eval_dir, capsys):
    names = ",".join(tasks.TASKS)
    args = ["--tasks", names, "--limit", "8", "--tasks-dir", str(eval_dir), "--json"]
    assert main(["eval", str(tiny_run), *args]) == 0
    a = json.loads(capsys.readouterr().out)
    assert main(["export", str(tiny_run), "--to", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "hf"), *args]) == 0
    b = json.loads(capsys.readouterr().out)
    assert a == b
    assert set(a["tasks"]) == set(tasks.TASKS)
    assert set(a["tasks"]["piqa"]) == {"acc", "acc_norm", "n"} and set(a["tasks"]["lambada"]) == {"acc", "ppl", "n"}
    assert all(m["n"] == 8 for m in a["tasks"].values())


def test_unknown_task(tiny_run, capsys):
    assert main(["eval", str(tiny_run), "--tasks", "piqa,mmlu"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'mmlu'; choose from lambada," in err and ", or all" in err


def test_eval_scores_perplexity_and_tasks_in_one_call(tiny_run, eval_dir, capsys):
    """--data and --tasks together: one JSON object with perplexity's keys and "tasks", each equal to
    what the command gives for one of them alone; the text form prints both."""
    data = ["--data", str(shared("wikitext2/valid.txt")), "--max-tokens", "512"]
    tasks_args = ["--tasks", "piqa,arc_easy", "--limit", "4", "--tasks-dir", str(eval_dir)]
    results = []
    for args in (data + tasks_args, data, tasks_args):
        assert main(["eval", str(tiny_run), *args, "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    both, ppl, scores = results
    assert both == {**ppl, **scores} and set(both["tasks"]) == {"piqa", "arc_easy"} and "loss" in both
    assert main(["eval", str(tiny_run), *data, *tasks_args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"loss {ppl['loss']:.4f}  ppl {ppl['ppl']:.2f}  tokens {ppl['tokens']}"
    assert [ln.split()[0] for ln in lines[1:]] == ["piqa", "arc_easy"]


def test_task_names_are_case_insensitive_and_all_runs_every_task_found(tiny_run, tmp_path, eval_dir, capsys,
                                                                       monkeypatch):
    """PIQA is piqa; "all" is every task whose folder the tasks folder holds, in the paper's order,
    here found through STEPLM_TASKS_DIR; a task named twice runs once, with a warning."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    for name in ("winogrande", "piqa"):
        (folder / name).symlink_to(eval_dir / name)
    monkeypatch.setenv("STEPLM_TASKS_DIR", str(folder))
    runs = {}
    for spec in ("PIQA,Winogrande", "all", "piqa,all"):
        assert main(["eval", str(tiny_run), "--tasks", spec, "--limit", "4", "--json"]) == 0
        out, err = capsys.readouterr()
        runs[spec] = json.loads(out)["tasks"]
        assert err == ("steplm: warning: --tasks: piqa is listed more than once; it runs once\n"
                       if spec == "piqa,all" else ""), err
    assert list(runs["all"]) == ["winogrande", "piqa"]  # tasks.TASKS order
    assert runs["PIQA,Winogrande"] == runs["all"] == runs["piqa,all"]


@pytest.mark.parametrize("env", [None, "missing"])
def test_a_tasks_folder_is_named_never_guessed(tiny_run, tmp_path, capsys, monkeypatch, env):
    """Without --tasks-dir and STEPLM_TASKS_DIR the line names both; a STEPLM_TASKS_DIR that is not a
    folder is named as such. No path of this repository's layout is tried."""
    (tmp_path / "shared" / "data" / "eval" / "piqa").mkdir(parents=True)  # this repository's layout, beside
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # the working directory, is not looked at
    if env:
        monkeypatch.setenv("STEPLM_TASKS_DIR", str(tmp_path / env))
    else:
        monkeypatch.delenv("STEPLM_TASKS_DIR", raising=False)
    assert main(["eval", str(tiny_run), "--tasks", "piqa"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("steplm: error: --tasks-dir: ")
    assert (f"$STEPLM_TASKS_DIR is {tmp_path / env}, which is not a directory" if env else
            "give the folder of task sets") in err and "STEPLM_TASKS_DIR" in err
