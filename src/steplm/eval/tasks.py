"""Zero-shot evaluation on the paper's seven tasks, with lm-evaluation-harness's definitions.

Prompts and metrics follow lm-eval's task configs: PIQA and ARC use "Question: ...\\nAnswer:",
OpenBookQA the bare question stem, HellaSwag "activity_label: ctx", WinoGrande partial scoring
(the option is substituted into the context and the shared suffix is scored), LAMBADA the last
word (acc = greedy match, ppl = exp(-mean log-likelihood)). ``acc_norm`` divides each choice's
log-likelihood by the character length of the choice string, exactly as lm-eval does (identical to
its byte length for ASCII text). Context/continuation splitting copies lm-eval's HF model: trailing
spaces of the context move to the continuation, and the continuation tokens are what the encoding
of context+continuation adds after the context's own encoding. Where one token spans the join, so
that nothing would be left to score, the boundary token is moved into the continuation (lm-eval
asserts there); an empty context is replaced by the model's prefix token (BOS, else EOS).
"""
from __future__ import annotations

import bz2
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from steplm.devices import model_device
from steplm.errors import UserError

TASKS = ("lambada", "arc_easy", "arc_challenge", "winogrande", "piqa", "openbookqa", "hellaswag")


@dataclass
class Doc:
    """One item: a (context, continuation) request per choice, the gold index and the choice strings."""
    requests: list[tuple[str, str]]
    gold: int
    choices: list[str]


def _jsonl(path: Path) -> list[dict]:
    from steplm.io.files import read_jsonl
    return read_jsonl(path, "--tasks-dir")


def _need(path: Path, task: str) -> Path:
    if not path.is_file():
        raise UserError(f"--tasks-dir: {path} not found (needed by task {task})")
    return path


def load_task(name: str, data_dir: str | Path, limit: int | None = None) -> list[Doc]:
    """The task's documents, in file order, at most ``limit`` of them. A task file that is not in its
    dataset's format (a missing field, a bad label) is a UserError naming the task and folder."""
    from steplm.io.files import one_line
    if name not in TASKS:
        raise UserError(f"--tasks: unknown task {name!r}; choose from {', '.join(TASKS)}")
    try:
        docs = _load_task(name, Path(data_dir))
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, EOFError, OSError) as e:
        raise UserError(f"--tasks-dir: task {name}'s files under {data_dir} are not in its dataset's format "
                        f"({type(e).__name__}: {one_line(e)})")
    return docs[:limit] if limit else docs


class _Reader:
    """The items of one task file as they are read: each refusal names the file being read
    (``path``), the item (1-based) and the task."""

    def __init__(self, name: str, path: Path):
        self.name, self.path, self.docs = name, path, []

    def bad(self, item: int, what: str) -> UserError:
        return UserError(f"--tasks-dir: {self.path} item {item + 1}: {what} (task {self.name})")

    def text(self, item: int, value, field: str, blank_ok: bool = True) -> str:
        """A field that must be text (never a list or null turned into "['Q']" or "None")."""
        if not isinstance(value, str):
            raise self.bad(item, f"'{field}' is not text ({type(value).__name__})")
        if not blank_ok and not value.strip():
            raise self.bad(item, f"'{field}' is empty: nothing to score")
        return value

    def add(self, doc: Doc, item: int, answer) -> None:
        """Keep one item; an answer that names none of its choices is the file's fault, not a miss."""
        if self.name != "lambada" and len(doc.requests) < 2:
            raise self.bad(item, f"{len(doc.requests)} choice(s): a multiple-choice item needs at least 2")
        if not 0 <= doc.gold < len(doc.requests):
            raise self.bad(item, f"the answer {answer!r} is not one of its {len(doc.requests)} choices")
        self.docs.append(doc)


def _piqa(r: _Reader, d: Path) -> None:
    r.path = _need(d / "piqa" / "valid.jsonl", r.name)
    label_path = _need(d / "piqa" / "valid-labels.lst", r.name)
    rows, labels = _jsonl(r.path), label_path.read_text().split()
    if len(rows) != len(labels):  # zip would drop the surplus silently
        raise UserError(f"--tasks-dir: {label_path} holds {len(labels)} labels for the {len(rows)} items of "
                        f"{r.path} (task {r.name}): one label per item")
    for i, (row, lab) in enumerate(zip(rows, labels)):
        ctx = f"Question: {r.text(i, row['goal'], 'goal')}\nAnswer:"
        ch = [r.text(i, row[k], k, blank_ok=False) for k in ("sol1", "sol2")]
        if lab not in ("0", "1"):
            r.path = label_path
        r.add(Doc([(ctx, " " + c) for c in ch], int(lab) if lab in ("0", "1") else -1, ch), i, lab)


def _arc_or_openbookqa(r: _Reader, d: Path) -> None:
    file = {"arc_easy": "ARC-Easy-Test", "arc_challenge": "ARC-Challenge-Test", "openbookqa": "test"}[r.name]
    r.path = _need(d / r.name / f"{file}.jsonl", r.name)
    for i, row in enumerate(_jsonl(r.path)):
        q = row["question"]
        ch = [r.text(i, c["text"], "text", blank_ok=False) for c in q["choices"]]
        stem = r.text(i, q["stem"], "stem")
        ctx = stem if r.name == "openbookqa" else f"Question: {stem}\nAnswer:"
        labels = [c["label"] for c in q["choices"]]
        if len(set(map(str, labels))) != len(labels):  # index() would pick the first silently
            raise r.bad(i, f"the choice labels {labels} repeat")
        gold = labels.index(row["answerKey"]) if row["answerKey"] in labels else -1
        r.add(Doc([(ctx, " " + c) for c in ch], gold, ch), i, row["answerKey"])


def _hellaswag(r: _Reader, d: Path) -> None:
    r.path = _need(d / "hellaswag" / "hellaswag_val_full.txt.bz2", r.name)
    with bz2.open(r.path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:  # context, gold, four endings: a short last item would be dropped silently
        raise UserError(f"--tasks-dir: {r.path} holds {len(lines)} lines, not a multiple of 6 (a context, "
                        f"the gold index and four endings per item; task {r.name})")
    for i in range(0, len(lines), 6):
        ctx, gold, endings = lines[i], lines[i + 1].strip(), lines[i + 2:i + 6]
        for e in endings:
            r.text(i // 6, e, "ending", blank_ok=False)
        r.add(Doc([(ctx, " " + e) for e in endings], int(gold) if gold in ("0", "1", "2", "3") else -1, endings),
              i // 6, gold)


def _winogrande(r: _Reader, d: Path) -> None:
    r.path = _need(d / "winogrande" / "dev.jsonl", r.name)
    for i, row in enumerate(_jsonl(r.path)):
        s = r.text(i, row["sentence"], "sentence")
        if "_" not in s:
            raise r.bad(i, "the sentence has no '_' blank")
        idx = s.index("_")
        suffix = s[idx + 1:].strip()
        if not suffix:  # partial scoring scores what follows the blank
            raise r.bad(i, "nothing follows the sentence's '_' blank: nothing to score")
        contexts = [s[:idx] + r.text(i, row[k], k, blank_ok=False) for k in ("option1", "option2")]
        answer = str(row["answer"])
        r.add(Doc([(c, " " + suffix) for c in contexts], int(answer) - 1 if answer in ("1", "2") else -1, contexts),
              i, row["answer"])


def _lambada(r: _Reader, d: Path) -> None:
    r.path = _need(d / "lambada" / "lambada_test.jsonl", r.name)
    for i, row in enumerate(_jsonl(r.path)):
        words = r.text(i, row["text"], "text").split(" ")
        if not words[-1].strip():  # lm-eval's target is the text after its last space
            raise r.bad(i, "the text ends in a space or is empty: no last word to predict")
        r.docs.append(Doc([(" ".join(words[:-1]), " " + words[-1])], 0, [words[-1]]))


_READERS = {"piqa": _piqa, "arc_easy": _arc_or_openbookqa, "arc_challenge": _arc_or_openbookqa,
            "openbookqa": _arc_or_openbookqa, "hellaswag": _hellaswag, "winogrande": _winogrande,
            "lambada": _lambada}


def _load_task(name: str, d: Path) -> list[Doc]:
    """The items of task ``name`` under the tasks folder ``d`` (its dataset's own file format)."""
    r = _Reader(name, d)
    _READERS[name](r, d)
    if not r.docs:  # a score over no items is not a score
        raise UserError(f"--tasks-dir: {r.path} holds no items (task {name})")
    return r.docs


def encode_pair(encode, context: str, continuation: str, prefix: int) -> tuple[list[int], list[int]]:
    """lm-eval's split of a request into context and continuation token ids, both non-empty.

    ``prefix`` (BOS, else EOS) stands in for an empty context. When the whole string encodes to no
    more tokens than the context alone (one token spans the join), the last token of the whole
    encoding becomes the continuation, so a choice is never scored as probability 1."""
    if not continuation:
        raise UserError(f"--tasks-dir: an empty continuation after context {context[-40:]!r}")
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        cont = encode(continuation)
        if len(cont) > 1 and cont[0] == prefix:  # lm-eval: the continuation's own first token is the prefix
            return cont[:1], cont[1:]
        ctx = [prefix]
    else:
        whole, ctx = encode(context + continuation), encode(context)
        cont = whole[len(ctx):]
        if not cont:  # the boundary token swallowed the continuation: score it as part of the continuation
            ctx, cont = whole[:-1] or [prefix], whole[-1:]
    if not cont:
        raise UserError(f"--tasks-dir: continuation {continuation!r} encodes to no tokens")
    return ctx, cont


@torch.no_grad()
def loglikelihoods(model, encode, prefix: int, requests: list[tuple[str, str]], batch_size: int = 16,
                   progress: bool = False) -> list[tuple[float, bool]]:
    """(sum of continuation log-probs, whether greedy decoding reproduces it) for each request; log-probs in
    fp32 (under a bf16 autocast the hidden states and head matmul are bf16), on the model's device.
    ``prefix`` is the token for an empty context (BOS, else EOS). Requests run longest-first in padded
    batches; only continuation positions go through the head."""
    from tqdm import tqdm

    max_len = model.config.max_seq_len
    encoded = []
    for ctx, cont in requests:
        c, k = encode_pair(encode, ctx, cont, prefix)
        seq = (c + k)[-(max_len + 1):][:-1]  # left-truncated to the model's window, as lm-eval does
        encoded.append((seq, k[-len(seq):]))  # a continuation longer than the window is scored on its tail
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    out: list[tuple[float, bool] | None] = [None] * len(encoded)
    device = model_device(model)
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc="scoring", disable=not progress, mininterval=1):
        idx = order[start:start + batch_size]
        T = max(len(encoded[i][0]) for i in idx)
        x = torch.zeros(len(idx), T, dtype=torch.long)
        for row, i in enumerate(idx):
            seq = encoded[i][0]
            x[row, :len(seq)] = torch.tensor(seq)
        hidden = model(x.to(device), return_hidden=True)  # (B, T, d)
        for row, i in enumerate(idx):
            seq, cont = encoded[i]
            n = len(cont)
            h = hidden[row, len(seq) - n:len(seq)]  # positions that predict the continuation
            logp = F.log_softmax(model.lm_head(h).float(), dim=-1)  # (n, V)
            target = torch.tensor(cont, device=device)
            out[i] = (logp.gather(1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all()))
    return out


def evaluate_tasks(model, tokenizer, tasks: list[str], data_dir: str | Path, limit: int | None = None,
                   batch_size: int = 16, progress: bool = False, special=None) -> dict:
    """{"tasks": {name: metrics}}: acc/acc_norm/n for multiple choice, acc/ppl/n for LAMBADA, acc/n for WinoGrande.
    ``special`` (tokens.SpecialTokens) gives the empty-context prefix; default GPT-2's <|endoftext|>."""
    from steplm.eval.loss import perplexity_of
    from steplm.io.special_tokens import check_ids, gpt2_special_tokens

    vocab = getattr(getattr(model, "config", None), "vocab_size", None)  # None: a model without a config

    def encode(s):
        ids = tokenizer.encode(s, add_special_tokens=False).ids
        if vocab is not None:
            check_ids(ids, vocab, f"a {name} example")
        return ids

    prefix = (special or gpt2_special_tokens(tokenizer)).prefix_id
    if vocab is not None:
        check_ids([prefix], vocab, "the empty-context prefix (BOS or EOS)")
    result = {}
    for name in tasks:
        docs = load_task(name, data_dir, limit)
        flat = [r for doc in docs for r in doc.requests]
        scores = loglikelihoods(model, encode, prefix, flat, batch_size, progress)
        pos, acc, acc_norm, lls = 0, 0.0, 0.0, []
        for doc in docs:
            k = len(doc.requests)
            part = scores[pos:pos + k]
            pos += k
            lls_doc = [s[0] for s in part]
            if name == "lambada":
                acc += part[0][1]
                lls.append(part[0][0])
                continue
            acc += max(range(k), key=lambda j: lls_doc[j]) == doc.gold
            norm = [ll / len(c) for ll, c in zip(lls_doc, doc.choices)]
            acc_norm += max(range(k), key=lambda j: norm[j]) == doc.gold
        n = len(docs)
        if name == "lambada":
            result[name] = {"acc": acc / n, "ppl": perplexity_of(-sum(lls) / n), "n": n}
        elif name == "winogrande":
            result[name] = {"acc": acc / n, "n": n}
        else:
            result[name] = {"acc": acc / n, "acc_norm": acc_norm / n, "n": n}
    return {"tasks": result}
