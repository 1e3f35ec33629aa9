"""Text generation with a KV cache, the Alpaca prompt template, and MT-Bench answer files."""
from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import torch

from steplm.devices import model_device
from steplm.errors import UserError
from steplm.model.llama import KVCache
from steplm.io.special_tokens import SpecialTokens, check_ids, gpt2_special_tokens

PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Stanford Alpaca prompt for one instruction (with or without an input)."""
    if input.strip():
        return PROMPT_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> int:
    """One token id from (V,) logits: greedy at temperature 0, else temperature/top-k/top-p sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    # in fp64 and less the largest logit: a tiny temperature (down to 5e-324) sends the others to
    # -inf and keeps the largest at 0, where fp32 would divide by a temperature rounded to 0
    logits = logits.double()
    logits = (logits - logits.max()) / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))


def generate(model, prompt_ids: list[int], max_new_tokens: int, eos: int | Iterable[int] | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0) -> list[int]:
    """New token ids after ``prompt_ids``; stops at ``eos`` (an id or several, not returned). One forward
    of the prompt, then one token per step against the KV cache."""
    return generate_batch(model, [prompt_ids], max_new_tokens, eos, temperature, top_k, top_p, seed)[0]


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, eos: int | Iterable[int] | None = None,
                   temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                   seed: int = 0) -> list[list[int]]:
    """New token ids after each prompt, as ``generate`` gives them one at a time: prompts are left-padded
    into one batch (padding masked out, RoPE positions counted per row) and decoded against one KV cache.
    Each row samples from its own generator seeded with ``seed``; a finished row feeds masked padding."""
    if not prompts or any(not p for p in prompts):
        raise UserError("--prompt: the prompt encodes to no tokens")
    stop = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    limit = model.config.max_seq_len
    prompts = [p[-(limit - 1):] for p in prompts]
    budget = [min(max_new_tokens, limit - len(p)) for p in prompts]  # new tokens each row may still add
    B, P = len(prompts), max(len(p) for p in prompts)
    device = model_device(model)
    model.eval()
    ragged = any(len(p) != P for p in prompts)
    x = torch.zeros(B, P, dtype=torch.long)
    valid = torch.zeros(B, P, dtype=torch.bool)
    for row, p in enumerate(prompts):
        x[row, P - len(p):] = torch.tensor(p)  # left padding: every row's last prompt token is at P-1
        valid[row, P - len(p):] = True
    x, valid = x.to(device), valid.to(device)
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)  # (B, P)
    caches = [KVCache() for _ in model.model.layers]
    gens = [torch.Generator().manual_seed(seed) for _ in prompts]
    logits = model(x, caches, attention_mask=valid if ragged else None,
                   position_ids=positions if ragged else None)[:, -1]  # (B, V)
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # real tokens per row so far
    out: list[list[int]] = [[] for _ in prompts]
    done = [b == 0 for b in budget]
    while not all(done):
        nxt = torch.zeros(B, dtype=torch.long)
        logits = logits.float().cpu()
        for row in range(B):
            if done[row]:
                continue
            tok = sample_next(logits[row], temperature, top_k, top_p, gens[row])
            if tok in stop:
                done[row] = True
                continue
            out[row].append(tok)
            nxt[row] = tok
            done[row] = len(out[row]) == budget[row]
        if all(done):
            break
        live = torch.tensor([not d for d in done], device=device)  # a finished row's new token is padding
        valid = torch.cat((valid, live[:, None]), dim=1)
        step_pos = lengths.clamp(max=limit - 1)[:, None]  # (B, 1)
        lengths = lengths + live.long()
        logits = model(nxt[:, None].to(device), caches, attention_mask=valid if ragged or not live.all() else None,
                       position_ids=step_pos if ragged or not live.all() else None)[:, -1]
    return out


def warn_context(prompts: list[list[int]], max_new_tokens: int, limit: int):
    """One stderr warning line for each way ``generate_batch`` will fit prompts into the model's
    context of ``limit`` tokens: prompts cut to their last limit-1 tokens, and --max-new-tokens
    capped so that prompt and answer fit. Silent when nothing is cut."""
    n = len(prompts)
    cut = [len(p) for p in prompts if len(p) > limit - 1]
    capped = [len(p) for p in prompts if min(len(p), limit - 1) + max_new_tokens > limit]
    if cut:
        what = (f"the prompt ({cut[0]} tokens) exceeds" if n == 1 else
                f"{len(cut)} of {n} prompts (up to {max(cut)} tokens) exceed")
        print(f"steplm: warning: {what} the model's context (max_seq_len {limit}); only the last {limit - 1} "
              f"tokens are used", file=sys.stderr)
    if capped:
        room = limit - min(max(capped), limit - 1)
        what = f"at {room} new tokens" if n == 1 else f"for {len(capped)} of {n} prompts (down to {room} new tokens)"
        print(f"steplm: warning: --max-new-tokens {max_new_tokens} is capped {what}: prompt and answer must fit in "
              f"the model's context (max_seq_len {limit})", file=sys.stderr)


def generate_many(model, prompts: list[list[int]], batch_size: int = 8, progress: bool = False,
                  **kw) -> list[list[int]]:
    """``generate_batch`` over many prompts, longest first in batches of ``batch_size``; results in input order."""
    from tqdm import tqdm

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int] | None] = [None] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="generating", disable=not progress):
        idx = order[start:start + batch_size]
        for i, ids in zip(idx, generate_batch(model, [prompts[i] for i in idx], **kw)):
            out[i] = ids
    return out


def complete(model, tokenizer, text: str, special: SpecialTokens | None = None, **kw) -> str:
    """The decoded continuation of ``text``, which is encoded with the tokenizer's own template (a Llama
    tokenizer adds its BOS); generation stops at any of the model's stop ids."""
    return complete_many(model, tokenizer, [text], special, **kw)[0]


def complete_many(model, tokenizer, texts: list[str], special: SpecialTokens | None = None, batch_size: int = 8,
                  progress: bool = False, **kw) -> list[str]:
    """``complete`` for each of ``texts``, generated in length-sorted batches of ``batch_size``."""
    special = special or gpt2_special_tokens(tokenizer)
    prompts = [tokenizer.encode(t).ids for t in texts]
    for p in prompts:
        check_ids(p, model.config.vocab_size, "the prompt")
    warn_context(prompts, kw.get("max_new_tokens", 0), model.config.max_seq_len)
    ids = generate_many(model, prompts, batch_size, progress, eos=special.stop_ids, **kw)
    return [tokenizer.decode(x) for x in ids]


def mt_bench_answers(model, tokenizer, questions: str | Path, out: str | Path, model_id: str,
                     limit: int | None = None, progress: bool = False, special: SpecialTokens | None = None,
                     batch_size: int = 8, **kw) -> int:
    """Answer both turns of every MT-Bench question; write FastChat llm_judge answer JSONL. Returns the count.
    Turn 1 of all questions is generated in length-sorted batches, then turn 2 (which needs turn 1's answer)."""
    from steplm.io.files import read_jsonl
    qpath = Path(questions)
    if qpath.is_dir():
        raise UserError(f"--questions: {qpath} is a directory; give its question.jsonl")
    if not qpath.is_file():
        raise UserError(f"--questions: {qpath} not found")
    rows = read_jsonl(qpath, "--questions")
    if not rows:
        raise UserError(f"--questions: {qpath} holds no questions")
    if any(not isinstance(r.get("turns"), list) or not r["turns"] or not all(isinstance(t, str) for t in r["turns"])
           or "question_id" not in r for r in rows):
        raise UserError(f"--questions: {qpath} is not an MT-Bench question file (needs question_id and a list of "
                        "turns, each a string)")
    seen = set()
    for n, r in enumerate(rows, 1):  # FastChat's judge matches answers to questions by id
        qid = r["question_id"]
        if isinstance(qid, bool) or not isinstance(qid, (int, str)) or (isinstance(qid, str) and not qid.strip()):
            raise UserError(f"--questions: line {n} of {qpath}: question_id {qid!r} is not an integer or a name")
        if qid in seen:
            raise UserError(f"--questions: line {n} of {qpath}: question_id {qid!r} repeats an earlier question's")
        seen.add(qid)
        if any(not t.strip() for t in r["turns"]):
            raise UserError(f"--questions: line {n} of {qpath}: a turn is empty")
    rows = rows[:limit] if limit else rows
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    conversations, answers = [""] * len(rows), [[] for _ in rows]
    for t in range(max((len(q["turns"]) for q in rows), default=0)):  # turn t of every question in one pass
        ask = [i for i, q in enumerate(rows) if t < len(q["turns"])]
        for i in ask:
            turn = rows[i]["turns"][t]
            conversations[i] += alpaca_prompt(turn) if t == 0 else f"\n\n### Instruction:\n{turn}\n\n### Response:\n"
        replies = complete_many(model, tokenizer, [conversations[i] for i in ask], special, batch_size, progress, **kw)
        for i, reply in zip(ask, replies):
            conversations[i] += reply.strip()
            answers[i].append(reply.strip())
    try:
        with open(tmp, "w") as f:
            for q, turns in zip(rows, answers):
                f.write(json.dumps({"question_id": q["question_id"], "answer_id": uuid.uuid4().hex[:22],
                                    "model_id": model_id, "choices": [{"index": 0, "turns": turns}],
                                    "tstamp": time.time()}) + "\n")
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(rows)
