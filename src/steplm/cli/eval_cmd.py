"""`steplm eval`: perplexity of a model on text, or its zero-shot task scores."""
from __future__ import annotations

import os
from pathlib import Path

from steplm.cli.args import MODEL_HELP, name_arg, positive_int, precision, add_precision
from steplm.errors import UserError, warn
from steplm.io.files import dumps


TASKS_DIR_ENV = "STEPLM_TASKS_DIR"


def _tasks_dir(given: str | None) -> str:
    """The folder of task sets: --tasks-dir, else $STEPLM_TASKS_DIR. A folder named either way that is
    not one is refused, never silently replaced."""
    if given:
        if not Path(given).is_dir():
            raise UserError(f"--tasks-dir: {given} is not a directory")
        return given
    env = os.environ.get(TASKS_DIR_ENV)
    if env:
        if not Path(env).is_dir():
            raise UserError(f"--tasks-dir: ${TASKS_DIR_ENV} is {env}, which is not a directory; fix it or give "
                            f"--tasks-dir")
        return env
    raise UserError(f"--tasks-dir: give the folder of task sets (one subfolder per task: piqa/, arc_easy/, ...; "
                    f"docs/commands.md lists the files), or set {TASKS_DIR_ENV} to it")


def task_names(given: str, tasks_dir: str | None) -> tuple[list[str], str]:
    """(task names, tasks folder) of --tasks: comma-separated, case-insensitive (PIQA = piqa), "all" for
    every task whose folder --tasks-dir holds; a name listed twice runs once, with a warning."""
    from steplm.eval.tasks import TASKS

    names = [t.strip().lower() for t in given.split(",") if t.strip()]
    if not names:
        raise UserError(f"--tasks: give at least one task name ({', '.join(TASKS)}) or all")
    unknown = [t for t in names if t not in TASKS and t != "all"]
    if unknown:
        raise UserError(f"--tasks: unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}, or all")
    folder = _tasks_dir(tasks_dir)
    if "all" in names:
        found = [t for t in TASKS if (Path(folder) / t).is_dir()]
        if not found:
            raise UserError(f"--tasks-dir: {folder} holds none of the task folders ({', '.join(TASKS)})")
        names = [n for n in names if n != "all"] + found
    unique = list(dict.fromkeys(names))
    if len(unique) < len(names):
        twice = next(n for n in unique if names.count(n) > 1)
        warn(f"--tasks: {twice} is listed more than once; it runs once")
    return unique, folder


def _warn_unused(a) -> None:
    """Flags of the mode not asked for change nothing: one warning each, and the command goes on."""
    if a.data is None:
        for flag, value in (("--seq-len", a.seq_len), ("--max-tokens", a.max_tokens), ("--backend", a.backend),
                            ("--text-field", a.text_field)):
            if value is not None:
                warn(f"{flag} has no effect without --data (it sets how perplexity is scored; the tasks score "
                     f"their own items with steplm's model)")
    if a.tasks is None:
        for flag, value in (("--limit", a.limit), ("--tasks-dir", a.tasks_dir)):
            if value is not None:
                warn(f"{flag} has no effect without --tasks (add --tasks all to run every task)")


def cmd_eval(a):
    """Perplexity on --data, zero-shot scores on --tasks, or both (one model load): printed as lines,
    or with --json as one object (perplexity's keys, and "tasks")."""
    from steplm.devices import autocast
    from steplm.io.run_dir import load_model_dir
    from steplm.eval.perplexity import perplexity

    device, dtype = precision(a)
    if a.data is None and a.tasks is None:
        raise UserError("--data: give a text file to score (perplexity), --tasks (zero-shot scores), or both")
    _warn_unused(a)
    if a.data is not None and not Path(a.data).exists():  # before the model is loaded
        raise UserError(f"--data: {a.data} does not exist")
    names, tasks_dir = task_names(a.tasks, a.tasks_dir) if a.tasks is not None else ([], None)
    res, m = {}, None
    if a.data is not None:
        backend = a.backend or "steplm"
        if backend == "steplm":
            m = load_model_dir(a.model, device)
        res = perplexity(m or a.model, a.data, a.max_tokens, backend, a.seq_len, a.batch_size, device=device,
                         dtype=dtype, text_field=a.text_field or "text")
    if names:
        from steplm.eval.tasks import evaluate_tasks
        m = m or load_model_dir(a.model, device)
        with autocast(device, dtype):
            res.update(evaluate_tasks(m.model, m.tokenizer, names, tasks_dir, a.limit, a.batch_size,
                                      progress=not a.json, special=m.special))
    if a.json:
        print(dumps(res))
        return
    if "loss" in res:
        print(f"loss {res['loss']:.4f}  ppl {res['ppl']:.2f}  tokens {res['tokens']}")
    for name, scores in res.get("tasks", {}).items():
        print(f"{name:<14} " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in scores.items()))


def add_parsers(sub) -> None:
    e = sub.add_parser("eval", help="held-out perplexity (--data) and zero-shot task scores (--tasks) of a model")
    e.add_argument("model", help=MODEL_HELP)
    e.add_argument("--data", help="text file (.txt/.jsonl/.jsonl.gz/.parquet)")
    e.add_argument("--text-field", type=name_arg,
                   help="the field of .jsonl/.parquet records that holds the text (default text)")
    e.add_argument("--max-tokens", type=positive_int, help="score at most this many tokens, in whole windows of "
                   "--seq-len (so at least one window)")
    e.add_argument("--seq-len", type=positive_int, help="window length (default: the model's max_seq_len)")
    e.add_argument("--batch-size", type=positive_int, default=8, help="windows scored together (default 8)")
    e.add_argument("--backend", choices=["steplm", "transformers"],
                   help="score with steplm's model (default) or with transformers' LlamaForCausalLM")
    e.add_argument("--tasks", help="zero-shot tasks, comma-separated and case-insensitive: lambada,arc_easy,"
                                   "arc_challenge,winogrande,piqa,openbookqa,hellaswag, or all (every task in "
                                   "--tasks-dir); with --data too, both are reported")
    e.add_argument("--tasks-dir", help=f"the folder of task sets, one subfolder per task (default ${TASKS_DIR_ENV})")
    e.add_argument("--limit", type=positive_int, help="score only the first N items of each task")
    e.add_argument("--json", action="store_true", help="print one JSON line")
    add_precision(e, "fp32")  # fp32 is the reference for perplexity and task scores
    e.set_defaults(fn=cmd_eval)
