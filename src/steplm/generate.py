"""Text generation with a KV cache, the Alpaca prompt template, and MT-Bench answer files."""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import torch

from .errors import UserError
from .model import KVCache
from .tokens import SpecialTokens, gpt2_special_tokens

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
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, eos: int | Iterable[int] | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0) -> list[int]:
    """New token ids after ``prompt_ids``; stops at ``eos`` (an id or several, not returned). One forward
    of the prompt, then one token per step against the KV cache."""
    if not prompt_ids:
        raise UserError("--prompt: the prompt encodes to no tokens")
    stop = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    limit = model.config.max_seq_len
    prompt_ids = prompt_ids[-(limit - 1):]
    max_new_tokens = min(max_new_tokens, limit - len(prompt_ids))
    model.eval()
    caches = [KVCache() for _ in model.model.layers]
    gen = torch.Generator().manual_seed(seed)
    logits = model(torch.tensor([prompt_ids]), caches)[0, -1]
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, gen)
        if nxt in stop:
            break
        out.append(nxt)
        if len(out) == max_new_tokens:
            break
        logits = model(torch.tensor([[nxt]]), caches)[0, -1]
    return out


def complete(model, tokenizer, text: str, special: SpecialTokens | None = None, **kw) -> str:
    """The decoded continuation of ``text``, which is encoded with the tokenizer's own template (a Llama
    tokenizer adds its BOS); generation stops at any of the model's stop ids."""
    special = special or gpt2_special_tokens(tokenizer)
    ids = generate(model, tokenizer.encode(text).ids, eos=special.stop_ids, **kw)
    return tokenizer.decode(ids)


def mt_bench_answers(model, tokenizer, questions: str | Path, out: str | Path, model_id: str,
                     limit: int | None = None, progress: bool = False, special: SpecialTokens | None = None,
                     **kw) -> int:
    """Answer both turns of every MT-Bench question; write FastChat llm_judge answer JSONL. Returns the count."""
    from tqdm import tqdm

    qpath = Path(questions)
    if not qpath.is_file():
        raise UserError(f"--questions: {qpath} not found")
    rows = [json.loads(x) for x in qpath.read_text().splitlines() if x.strip()]
    if any("turns" not in r or "question_id" not in r for r in rows):
        raise UserError(f"--questions: {qpath} is not an MT-Bench question file (needs question_id and turns)")
    rows = rows[:limit] if limit else rows
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            for q in tqdm(rows, desc="mt-bench", disable=not progress):
                conversation, turns = "", []
                for turn in q["turns"]:
                    conversation += alpaca_prompt(turn) if not turns else f"\n\n### Instruction:\n{turn}\n\n### Response:\n"
                    answer = complete(model, tokenizer, conversation, special, **kw).strip()
                    conversation += answer
                    turns.append(answer)
                f.write(json.dumps({"question_id": q["question_id"], "answer_id": uuid.uuid4().hex[:22],
                                    "model_id": model_id, "choices": [{"index": 0, "turns": turns}],
                                    "tstamp": time.time()}) + "\n")
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(rows)
