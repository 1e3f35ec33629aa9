"""`steplm eval`: perplexity of a model on text, or its zero-shot task scores."""
from __future__ import annotations

import os
from pathlib import Path

from steplm.cli.args import text_arg, positive_int, precision, add_precision
from steplm.errors import UserError
from steplm.io.files import dumps


def _tasks_dir(given: str | None) -> str:
    if given and not Path(given).is_dir():  # a folder the user named is never silently replaced
        raise UserError(f"--tasks-dir: {given} is not a directory")
    for cand in (given, os.environ.get("STEPLM_TASKS_DIR"), "../shared/data/eval"):
        if cand and Path(cand).is_dir():
            return cand
    raise UserError("--tasks-dir: give the directory holding the task files (or set STEPLM_TASKS_DIR)")


def cmd_eval(a):
    from steplm.devices import autocast
    from steplm.io.run_dir import load_model_dir
    from steplm.eval.perplexity import perplexity

    device, dtype = precision(a)
    task_mode = a.tasks is not None
    unused = ([("--data", a.data), ("--seq-len", a.seq_len), ("--max-tokens", a.max_tokens),
               ("--backend", a.backend), ("--text-field", a.text_field)] if task_mode else
              [("--limit", a.limit), ("--tasks-dir", a.tasks_dir)])
    for flag, value in unused:  # a flag that would change nothing is refused, not ignored
        if value is not None:
            raise UserError(f"{flag}: " + ("not used with --tasks (the tasks score their own items with steplm's "
                                           "model)" if task_mode else "used only with --tasks"))

    if task_mode:
        from steplm.eval.tasks import TASKS, evaluate_tasks
        names = [t.strip() for t in a.tasks.split(",") if t.strip()]
        if not names:
            raise UserError(f"--tasks: give at least one task name ({', '.join(TASKS)})")
        unknown = [t for t in names if t not in TASKS]
        if unknown:
            raise UserError(f"--tasks: unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}")
        tasks_dir = _tasks_dir(a.tasks_dir)
        m = load_model_dir(a.model, device)
        with autocast(device, dtype):
            res = evaluate_tasks(m.model, m.tokenizer, names, tasks_dir, a.limit, a.batch_size,
                                 progress=not a.json, special=m.special)
        if a.json:
            print(dumps(res))
        else:
            for name, m in res["tasks"].items():
                print(f"{name:<14} " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in m.items()))
        return
    if not a.data:
        raise UserError("--data: give a text file to score (e.g. ../shared/data/wikitext2/valid.txt)")
    res = perplexity(a.model, a.data, a.max_tokens, a.backend or "steplm", a.seq_len, a.batch_size, device=device,
                     dtype=dtype, text_field=a.text_field or "text")
    print(dumps(res) if a.json else f"loss {res['loss']:.4f}  ppl {res['ppl']:.2f}  tokens {res['tokens']}")


def add_parsers(sub) -> None:
    e = sub.add_parser("eval", help="held-out perplexity of a run or HF directory")
    e.add_argument("model", help="run directory or HF Llama directory")
    e.add_argument("--data", help="text file (.txt/.jsonl/.jsonl.gz/.parquet)")
    e.add_argument("--text-field", type=text_arg,
                   help="the field of .jsonl/.parquet records that holds the text (default text)")
    e.add_argument("--max-tokens", type=positive_int, help="score at most this many tokens, in whole windows of "
                   "--seq-len (so at least one window)")
    e.add_argument("--seq-len", type=positive_int, help="window length (default: the model's max_seq_len)")
    e.add_argument("--batch-size", type=positive_int, default=8, help="windows scored together (default 8)")
    e.add_argument("--backend", choices=["steplm", "transformers"],
                   help="score with steplm's model (default) or with transformers' LlamaForCausalLM")
    e.add_argument("--tasks", help="zero-shot tasks, comma-separated: lambada,arc_easy,arc_challenge,winogrande,"
                                   "piqa,openbookqa,hellaswag")
    e.add_argument("--tasks-dir", help="task files (default $STEPLM_TASKS_DIR or ../shared/data/eval)")
    e.add_argument("--limit", type=positive_int, help="score only the first N items of each task")
    e.add_argument("--json", action="store_true", help="print one JSON line")
    add_precision(e, "fp32")  # fp32 is the reference for perplexity and task scores
    e.set_defaults(fn=cmd_eval)
