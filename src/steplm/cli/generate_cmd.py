"""`steplm generate` (complete a prompt) and `steplm mt-bench` (answer MT-Bench's questions)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

from steplm.cli.args import (MODEL_HELP, add_precision, first_missing, non_negative_int, positive_int, precision,
                             remove_created, seed_arg)
from steplm.errors import UserError, warn


def sampling_args(a) -> dict:
    """The sampling keywords of generate and mt-bench. A sampling flag under greedy decoding
    (--temperature 0) changes nothing: warned about, not refused. --top-k 0 and --top-p 1 mean "off"
    (as in transformers)."""
    if not (math.isfinite(a.temperature) and a.temperature >= 0):
        raise UserError(f"--temperature: must be a finite number >= 0, got {a.temperature}")
    if a.top_p is not None and not 0 < a.top_p <= 1:
        raise UserError(f"--top-p: must be in (0, 1] (1: off), got {a.top_p}")
    top_k = a.top_k or None  # 0: off
    top_p = a.top_p if a.top_p is not None and a.top_p < 1 else None  # 1: off
    if a.temperature == 0:  # greedy decoding draws nothing
        for flag, active in (("--top-k", top_k), ("--top-p", top_p), ("--seed", a.seed is not None)):
            if active:
                warn(f"{flag} has no effect under greedy decoding (--temperature 0); set --temperature > 0 to sample")
    return {"max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_k": top_k,
            "top_p": top_p, "seed": a.seed or 0}


def add_sampling(p, max_new=128):
    p.add_argument("--max-new-tokens", type=positive_int, default=max_new,
                   help=f"tokens to generate at most, capped by the model's context (default {max_new})")
    p.add_argument("--temperature", type=float, default=0.0, help="softmax temperature; 0 = greedy (default)")
    p.add_argument("--top-k", type=non_negative_int, help="sample from the k most likely tokens only (0: off)")
    p.add_argument("--top-p", type=float, help="nucleus sampling: the smallest set of tokens whose "
                   "probability reaches p, in (0, 1] (1: off)")
    p.add_argument("--seed", type=seed_arg, help="sampling seed, in [0, 2**32) (default 0; with --temperature > 0)")


def cmd_generate(a):
    from steplm.devices import autocast
    from steplm.io.run_dir import load_model_dir
    from steplm.eval.generate import alpaca_prompt, complete

    if not a.prompt:
        raise UserError("--prompt: give a non-empty prompt")
    sampling = sampling_args(a)
    device, dtype = precision(a)
    m = load_model_dir(a.model, device)
    text = alpaca_prompt(a.prompt) if a.alpaca else a.prompt
    with autocast(device, dtype):
        print(complete(m.model, m.tokenizer, text, m.special, **sampling))


def cmd_mt_bench(a):
    from steplm.devices import autocast
    from steplm.io.run_dir import load_model_dir
    from steplm.eval.generate import mt_bench_answers

    sampling = sampling_args(a)
    device, dtype = precision(a)
    out = Path(a.out)
    above = next((p for p in out.parents if p.exists()), Path("."))
    if not above.is_dir():  # a missing folder is created (as train and export do), one under a file cannot be
        raise UserError(f"--out: {above} is a file, not a directory")
    if out.is_dir():
        raise UserError(f"--out: {out} is a directory; give the answers file's path (e.g. {out / 'answers.jsonl'})")
    if out.exists() and out.resolve() == Path(a.questions).resolve():
        raise UserError(f"--out: {out} is the --questions file; give another path for the answers")
    if Path(a.model).resolve() in out.resolve().parents:  # never write into the model's own folder
        raise UserError(f"--out: {out} is inside MODEL ({a.model}); write the answers elsewhere")
    if out.exists() and out.suffix != ".jsonl":
        raise UserError(f"--out: {out} exists and is not a .jsonl answers file; give a new path or a .jsonl file")
    if a.model_id is not None and not a.model_id.strip():
        raise UserError("--model-id: give a non-empty name (default: the model folder's name)")
    m = load_model_dir(a.model, device)
    created = first_missing(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with autocast(device, dtype):
            n = mt_bench_answers(m.model, m.tokenizer, a.questions, out, a.model_id or Path(a.model).name, a.limit,
                                 progress=True, special=m.special, batch_size=a.batch_size, **sampling)
    except BaseException:
        if created:
            remove_created(out.parent, created)
        raise
    print(f"wrote {n} answers to {out}", file=sys.stderr)


def add_parsers(sub) -> None:
    g = sub.add_parser("generate", help="generate text (KV cache; greedy, temperature, top-k, top-p)")
    g.add_argument("model", help=MODEL_HELP)
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--alpaca", action="store_true", help="wrap the prompt in the Alpaca instruction template")
    add_sampling(g)
    add_precision(g)
    g.set_defaults(fn=cmd_generate)

    mb = sub.add_parser("mt-bench", help="answer MT-Bench's two turns; FastChat llm_judge answer format")
    mb.add_argument("model", help=MODEL_HELP)
    mb.add_argument("--questions", required=True, help="question.jsonl")
    mb.add_argument("--out", required=True, help="answers .jsonl")
    mb.add_argument("--model-id", help="model_id in the answer file (default: the model directory's name)")
    mb.add_argument("--limit", type=positive_int, help="answer only the first N questions")
    mb.add_argument("--batch-size", type=positive_int, default=8, help="questions generated together")
    add_sampling(mb, max_new=512)
    add_precision(mb)
    mb.set_defaults(fn=cmd_mt_bench)
