"""steplm's zero-shot numbers equal lm-evaluation-harness's on the same items.

lm-eval's own task downloads need a hub, so its tasks are defined here, locally, over the shared
files, with the prompts of lm-eval's piqa, lambada_openai and winogrande configs; lm-eval then
scores the exported HF directory through its own HF backend.
"""
import json

import pytest

from steplm.cli import main
from steplm.io.run_dir import load_model
from steplm.eval.tasks import evaluate_tasks

from conftest import shared

lm_eval = pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow

N = 40
WINOGRANDE_UTILS = '''
def doc_to_text(doc):
    return int(doc["answer"]) - 1


def doc_to_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]
'''


def write_tasks(tmp_path):
    d = tmp_path / "lm_eval_tasks"
    d.mkdir()
    piqa = [json.loads(x) for x in shared("eval/piqa/valid.jsonl").read_text().splitlines()][:N]
    labels = shared("eval/piqa/valid-labels.lst").read_text().split()
    with open(d / "piqa.jsonl", "w") as f:
        for r, lab in zip(piqa, labels):
            f.write(json.dumps({**r, "label": int(lab)}) + "\n")
    lam = shared("eval/lambada/lambada_test.jsonl").read_text().splitlines()[:N]
    (d / "lambada.jsonl").write_text("\n".join(lam) + "\n")
    wg = shared("eval/winogrande/dev.jsonl").read_text().splitlines()[:N]
    (d / "winogrande.jsonl").write_text("\n".join(wg) + "\n")
    (d / "utils.py").write_text(WINOGRANDE_UTILS)
    common = "dataset_path: json\ntest_split: test\n"
    (d / "piqa.yaml").write_text(
        f"task: local_piqa\n{common}dataset_kwargs:\n  data_files:\n    test: {d / 'piqa.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: \"Question: {{goal}}\\nAnswer:\"\ndoc_to_target: label\n"
        "doc_to_choice: \"{{[sol1, sol2]}}\"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (d / "lambada.yaml").write_text(
        f"task: local_lambada\n{common}dataset_kwargs:\n  data_files:\n    test: {d / 'lambada.jsonl'}\n"
        "output_type: loglikelihood\ndoc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
        "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\ntarget_delimiter: \"\"\n"
        "metric_list:\n  - metric: perplexity\n  - metric: acc\n")
    (d / "winogrande.yaml").write_text(
        f"task: local_winogrande\n{common}dataset_kwargs:\n  data_files:\n    test: {d / 'winogrande.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: !function utils.doc_to_text\n"
        "doc_to_target: !function utils.doc_to_target\ndoc_to_choice: !function utils.doc_to_choice\n"
        "metric_list:\n  - metric: acc\n")
    return d


def test_numbers_equal_lm_eval(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds_cache"))
    hf_dir = tmp_path / "hf"
    assert main(["export", str(tiny_run), "--to", str(hf_dir)]) == 0
    # lm-eval asserts that every continuation fits the window; the tiny model's BPE can make a long
    # PIQA answer exceed 256 tokens, so open the window (RoPE runs at any length) for both sides.
    for name, key in (("config.json", "max_position_embeddings"), ("tokenizer_config.json", "model_max_length")):
        cfg = json.loads((hf_dir / name).read_text())
        cfg[key] = 2048
        (hf_dir / name).write_text(json.dumps(cfg))
    task_dir = write_tasks(tmp_path)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    res = simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32", device="cpu", batch_size=4,
                          tasks=["local_piqa", "local_lambada", "local_winogrande"],
                          task_manager=TaskManager(include_path=str(task_dir)))["results"]
    model, tok = load_model(hf_dir)
    ours = evaluate_tasks(model, tok, ["piqa", "lambada", "winogrande"], shared("eval"), limit=N)["tasks"]
    assert ours["piqa"]["n"] == ours["lambada"]["n"] == ours["winogrande"]["n"] == N
    assert ours["piqa"]["acc"] == pytest.approx(res["local_piqa"]["acc,none"], abs=1e-9)
    assert ours["piqa"]["acc_norm"] == pytest.approx(res["local_piqa"]["acc_norm,none"], abs=1e-9)
    assert ours["lambada"]["acc"] == pytest.approx(res["local_lambada"]["acc,none"], abs=1e-9)
    assert ours["lambada"]["ppl"] == pytest.approx(res["local_lambada"]["perplexity,none"], rel=1e-4)
    assert ours["winogrande"]["acc"] == pytest.approx(res["local_winogrande"]["acc,none"], abs=1e-9)
