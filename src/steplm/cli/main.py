"""steplm command line: parses arguments and calls into the library. Bad input -> one line, exit 2."""
from __future__ import annotations

import argparse
import gc
import math
import os
import re
import shutil
import sys
import traceback
from pathlib import Path

from steplm.errors import UserError
from steplm.io.files import dumps
from steplm.plan import memory
from steplm.plan import solve


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A value that starts with '-' and a digit or '.' is a (bad) value, not an unknown option:
        # argparse's own test takes only plain negative numbers, so '--lr -1e-3' or
        # '--max-shard-size -5GB' said "expected one argument" instead of what is wrong with the value.
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message):  # one line, exit 2 (argparse prints usage + error otherwise)
        if "arguments are required: cmd" in message:  # `steplm` alone; 'cmd' is an internal name
            raise UserError(f"give a subcommand: {', '.join(self._subcommands())} (steplm --help says what each does)")
        message = message.replace("argument cmd: invalid choice", "unknown subcommand")
        where = self.prog.removeprefix("steplm").strip()  # main() prints the 'steplm: error:' prefix
        raise UserError(f"{where}: {message}" if where else message)

    def _subcommands(self) -> list[str]:
        return [name for action in self._actions if isinstance(action, argparse._SubParsersAction)
                for name in action.choices]


def _path(s: str) -> str:
    """An argparse type for file and folder arguments: an empty path would silently mean '.'."""
    if not s.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    if "\0" in s:
        raise argparse.ArgumentTypeError("a path cannot hold a NUL character")
    return s


def _text(s: str) -> str:
    """An argparse type for text that is tokenized or written into JSON/YAML: bytes that are not UTF-8
    arrive from the shell as lone surrogates, which no tokenizer or UTF-8 file can take."""
    if not _is_utf8(s):
        raise argparse.ArgumentTypeError("is not valid UTF-8 text")
    return s


def _is_utf8(s: str) -> bool:
    """Whether ``s`` encodes as UTF-8: undecodable argv bytes arrive as lone surrogates, which do not."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


TEXT_ARGS = {"prompt", "model_id", "set", "tasks", "layers_per_stage"}
PATH_ARGS = {"config", "data", "out", "to", "init_from", "model", "run_dir", "questions", "vanilla", "tasks_dir"}


def _positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return v


def _non_negative_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}")
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be non-negative, got {v}")
    return v


def _int_up_to(limit: int, what: str = "the planner's bound"):
    """An argparse type: a positive integer of at most ``limit``."""
    def parse(s):
        v = _positive_int(s)
        if v > limit:
            raise argparse.ArgumentTypeError(f"must be at most {limit} ({what}), got {v}")
        return v
    return parse


def _positive_float(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}")
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {s}")
    return v


def _seed(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}")
    if not 0 <= v < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {v}")
    return v


# ---------------------------------------------------------------------------- subcommands
def _fit(make_trainer, out: Path) -> dict | None:
    """Build a trainer and fit it; the summary on rank 0 (None on the other ranks). A run that fails
    before its first checkpoint leaves no directory it created behind."""
    from steplm.train import distributed
    from steplm.train.checkpoint import list_steps
    from steplm.train.guards import RunDirInUse

    created = _first_missing(out)  # --out a/b/run may create a and a/b as well
    trainer, fitted = None, False
    try:
        trainer = make_trainer()
        summary = trainer.fit()
        fitted, is_main = True, trainer.main
        distributed.barrier()  # no rank tears the group down while another still uses it
    except BaseException as e:
        # Nothing half-written left behind, unless the directory belongs to the run that holds it
        # (or this rank finished its run and only the closing barrier failed).
        if created and not fitted and not isinstance(e, RunDirInUse) and not list_steps(out / "checkpoints"):
            _remove_created(out, created)
        # The traceback's finished frames (Trainer.fit's among them) would keep the trainer alive
        # past the teardown below; their locals are not needed for the one-line message.
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        # The trainer sits in reference cycles with its DDP/FSDP wrappers, which hold the process
        # group: collected only at interpreter exit, a gloo group's teardown there aborted a rank
        # after a successful run ("terminate called without an active exception"). Free it now,
        # while the interpreter is whole, then destroy the group.
        trainer = None
        gc.collect()
        distributed.cleanup()
    return summary if is_main else None


def _out_path(given: str, flag: str) -> Path:
    """An output folder's path with 'a/../b' folded to 'b' (as the user means it): mkdir would
    otherwise create a as well, a folder nobody asked for. A path that is not UTF-8 is refused before
    any work: the tokenizers library writes tokenizer.json only through UTF-8 paths."""
    if not _is_utf8(given):
        raise UserError(f"{flag}: {given.encode('utf-8', 'surrogateescape')!r} is not a UTF-8 path; the tokenizer "
                        f"files cannot be written there, choose another name")
    return Path(os.path.normpath(given))


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet: what creating it
    would create. None when ``path`` exists."""
    path, top = path.absolute(), None
    while not path.exists() and path != path.parent:
        path, top = path.parent, path
    return top


def _remove_created(out: Path, top: Path) -> None:
    """Undo a failed command's folders: ``out`` (which it created, with everything in it), then each
    parent up to ``top`` while it is empty. A parent that meanwhile holds anything else (another
    run, a user's file) stays, with all it holds."""
    out = out.absolute()
    shutil.rmtree(out, ignore_errors=True)
    if top == out:
        return
    for parent in out.parents:
        try:
            parent.rmdir()  # only an empty folder
        except OSError:
            return
        if parent == top:
            return


def _refuse_flag_and_set(sets: list[str], *flags: tuple[str, str, object]) -> None:
    """A flag given (value not None) together with a --set of the key it sets: which one was meant?"""
    from steplm.config import override_key
    keys = {override_key(item) for item in sets}
    for flag, key, value in flags:
        if value is not None and key in keys:
            raise UserError(f"{flag}: also given as --set {key}; give one of them")


def cmd_train(a):
    from steplm import config
    from steplm.train.loop import Trainer

    overrides = list(a.set or [])
    _refuse_flag_and_set(overrides, ("--data", "data.path", a.data), ("--max-steps", "train.max_steps", a.max_steps),
                         ("--seed", "train.seed", a.seed), ("--init-from", "model.init_from", a.init_from))
    if a.data:
        overrides.append(f"data.path={a.data}")
    if a.max_steps is not None:
        overrides.append(f"train.max_steps={a.max_steps}")
    if a.seed is not None:
        overrides.append(f"train.seed={a.seed}")
    cfg = config.load(a.config, overrides, init_from=a.init_from)
    config.validate(cfg)
    out = _out_path(a.out, "--out")
    if a.fresh and out.exists() and any(out.iterdir()):
        raise UserError(f"--out: {out} is not empty; drop --fresh to resume from it, or choose another directory")
    summary = _fit(lambda: Trainer(cfg, out, progress=not a.quiet), out)
    if summary is None:
        return
    keys = ("method", "final_val_loss", "final_val_ppl", "tokens_seen", "flops", "train_seconds", "weights_sha256")
    print(dumps({k: summary[k] for k in keys}))
    print(f"run written to {out}/ (summary.json, metrics.jsonl, model.safetensors)", file=sys.stderr)


def _tasks_dir(given: str | None) -> str:
    if given and not Path(given).is_dir():  # a folder the user named is never silently replaced
        raise UserError(f"--tasks-dir: {given} is not a directory")
    for cand in (given, os.environ.get("STEPLM_TASKS_DIR"), "../shared/data/eval"):
        if cand and Path(cand).is_dir():
            return cand
    raise UserError("--tasks-dir: give the directory holding the task files (or set STEPLM_TASKS_DIR)")


def _precision(a):
    """(torch.device, torch.dtype) from --device and --dtype, with train.device/train.dtype's meaning."""
    from steplm.devices import pick_device, pick_dtype

    device = pick_device(a.device, "--device")
    return device, pick_dtype(a.dtype, device)


def cmd_eval(a):
    from steplm.devices import autocast
    from steplm.io.run_dir import load_model_dir
    from steplm.eval.perplexity import perplexity

    device, dtype = _precision(a)
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


def _size(s):
    """Bytes from '5GB', '500MB', '64KB' or a plain integer (argparse type for --max-shard-size)."""
    import re
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]B)?\s*", s, re.IGNORECASE)
    unit = {"": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12}[(m.group(2) or "").upper()] if m else 0
    if not m or float(m.group(1)) * unit < 1:
        raise argparse.ArgumentTypeError(f"expected a size such as 5GB, 500MB or 1000000, got {s!r}")
    return int(float(m.group(1)) * unit)


def cmd_export(a):
    from steplm.io.hf import export
    from steplm.io.run_dir import run_history
    from steplm.io.special_tokens import read_special_tokens
    from steplm.io.run_dir import load_run

    src = Path(a.run_dir)
    if src.exists() and not src.is_dir():
        raise UserError(f"RUN_DIR: {src} is a file, not a run directory")
    if not src.is_dir():
        raise UserError(f"RUN_DIR: {src} does not exist")
    out = _out_path(a.to, "--to")
    if out.exists() and not out.is_dir():
        raise UserError(f"--to: {out} is a file; give a new or empty directory")
    if out.is_dir() and any(out.iterdir()):  # never mix an export into a run or another model's files
        raise UserError(f"--to: {out} is not empty; give a new or empty directory")
    model, tok = load_run(src, who="RUN_DIR")
    special = read_special_tokens(src, tok)
    created = _first_missing(out)
    try:
        export(model, tok, out, special, dtype=a.dtype, max_shard_size=a.max_shard_size, history=run_history(src))
    except BaseException:
        if created:
            _remove_created(out, created)
        raise
    print(f"exported to {out}/ (load with AutoModelForCausalLM.from_pretrained)", file=sys.stderr)


def _plan_config(a):
    """`steplm plan CONFIG.yaml [--set ...]`: the whole StagePlan of a run config, before training."""
    from steplm import config
    from steplm.plan.stages import format_plan, plan_run

    shape_flags = [f for f in ("preset", "hidden", "layers", "stages", "lora_rank", "layers_per_stage", "ffn_hidden",
                               "n_heads", "n_kv_heads", "budget_gb", "optimizer_states", "master_weights", "cap_growth",
                               "extended", "vocab_size", "seq_len", "micro_batch", "checkpointing")
                   if getattr(a, f)]
    if shape_flags:
        flag = "--" + shape_flags[0].replace("_", "-")
        raise UserError(f"{flag}: not used with a CONFIG; change the config with --set (e.g. --set model.n_layers=24)")
    _refuse_flag_and_set(a.set or [], ("--init-from", "model.init_from", a.init_from))
    cfg = config.load(a.config, a.set or [], init_from=a.init_from)
    config.validate(cfg)
    try:
        plan = plan_run(cfg)
    except ValueError as e:
        raise UserError(f"step.layers_per_stage: {e}")
    print(dumps(plan.to_dict()) if a.json else format_plan(plan))


def _split(text: str) -> list[int]:
    """--layers-per-stage '7,5' as [7, 5]."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--layers-per-stage: expected comma-separated integers, got {text!r}")


def _check_plan_flags(a) -> None:
    """Refuse flags that the plan they are given with would not read: each would change nothing."""
    if a.budget_gb is not None:  # budget mode finds the depth and split itself
        for flag, value in (("--layers", a.layers), ("--layers-per-stage", a.layers_per_stage)):
            if value:
                raise UserError(f"{flag}: not used with --budget-gb, which finds the deepest model that fits")
    if not a.extended:
        for flag, value in (("--vocab-size", a.vocab_size), ("--seq-len", a.seq_len), ("--micro-batch", a.micro_batch),
                            ("--checkpointing", a.checkpointing)):
            if value:
                raise UserError(f"{flag}: describes the embeddings, head and activations, which only --extended "
                                f"adds; give --extended too")
    if a.layers_per_stage:
        split = _split(a.layers_per_stage)
        if a.stages and len(split) != a.stages:
            raise UserError(f"--stages: {a.stages} stages, but --layers-per-stage lists {len(split)}")
        if a.cap_growth:
            grown = [i for i in range(1, len(split)) if split[i] > sum(split[:i])]
            if grown:
                raise UserError(f"--layers-per-stage: stage {grown[0] + 1} adds {split[grown[0]]} layers to "
                                f"{sum(split[:grown[0]])}, more than --cap-growth allows (n_(i+1) <= N_i)")


def cmd_plan(a):

    if a.config or a.set or a.init_from:  # like `train`, --set alone starts from the default config
        return _plan_config(a)
    search = a.budget_gb is not None and not a.optimizer_states and not a.master_weights
    search_stages = a.budget_gb is not None and not a.stages and not a.preset
    _check_plan_flags(a)
    a.vocab_size, a.seq_len, a.micro_batch = a.vocab_size or 50257, a.seq_len or 1024, a.micro_batch or 1
    states = a.optimizer_states or ("bf16" if a.master_weights == "bf16" else "fp32")
    prec = memory.Precision(states, a.master_weights or "fp32")
    if prec.problems():
        flag = "--" + prec.problems()[0].split(":")[0].split(".")[1].replace("_", "-")
        raise UserError(f"{flag}: {prec.problems()[0].split(': ', 1)[1]}")
    if a.preset:
        p = memory.PRESETS[a.preset]
        a.hidden = a.hidden or p["d_model"]
        a.layers = a.layers or p["n_layers"]
        a.stages = a.stages or p["n_stages"]
        a.lora_rank = a.lora_rank or p["lora_rank"]
    a.stages = a.stages or 2
    if not a.hidden:
        raise UserError("--hidden: give the hidden size d (or --preset)")
    a.lora_rank = a.lora_rank or min(128, a.hidden)
    if a.lora_rank > a.hidden:
        raise UserError(f"--lora-rank: must be at most --hidden ({a.hidden}), got {a.lora_rank}")
    if a.n_heads and a.hidden % a.n_heads:  # the same shapes `train` takes (model.d_model, model.head_dim)
        raise UserError(f"--n-heads: must divide --hidden ({a.hidden}), got {a.n_heads}")
    if a.n_heads and (a.hidden // a.n_heads) % 2:
        raise UserError(f"--n-heads: the head size --hidden / --n-heads = {a.hidden // a.n_heads} must be even for "
                        f"RoPE, got {a.n_heads} heads")
    kv = None
    if a.n_kv_heads:
        if not a.n_heads or a.hidden % a.n_heads or a.n_heads % a.n_kv_heads:
            raise UserError("--n-kv-heads: needs --n-heads dividing --hidden and divisible by --n-kv-heads")
        kv = a.n_kv_heads * (a.hidden // a.n_heads)
    shape = memory.LayerShape(a.hidden, a.ffn_hidden, kv)
    heads = a.n_heads or max(1, a.hidden // 128)

    def extra(L, prec=prec):
        """Bytes beyond the layers' model states that --budget-gb must also fit (--extended)."""
        if not a.extended:
            return 0
        return memory.head_state_bytes(a.vocab_size, a.hidden, prec=prec) + activations(L)

    def activations(L):
        return memory.activation_bytes(L, a.hidden, heads, a.seq_len, a.micro_batch, a.vocab_size, a.checkpointing,
                                        ffn_hidden=a.ffn_hidden, kv_dim=kv)
    try:
        if a.budget_gb is not None and (search or search_stages):
            plan = solve.deepest_over(
                a.budget_gb * memory.GB,
                list(range(1, solve.MAX_SEARCH_STAGES + 1)) if search_stages else [a.stages],
                memory.PRECISIONS if search else [prec], shape, a.lora_rank, a.cap_growth, extra)
            prec = memory.Precision(plan.optimizer_states, plan.master_weights)
        elif a.budget_gb is not None:
            plan = solve.deepest_within(a.budget_gb * memory.GB, a.stages, shape, a.lora_rank, a.cap_growth, extra,
                                          prec=prec)
        else:
            if not a.layers:
                raise UserError("--layers: give the total layer count L (or --preset, or --budget-gb)")
            if a.stages > a.layers:
                raise UserError(f"--stages: must be at most --layers ({a.layers}), got {a.stages}")
            if a.layers_per_stage:
                split = _split(a.layers_per_stage)
                if len(split) > solve.MAX_STAGES:
                    raise UserError(f"--layers-per-stage: at most {solve.MAX_STAGES} stages (the planner's bound), "
                                    f"got {len(split)}")
                if any(n < 1 for n in split):
                    raise UserError("--layers-per-stage: every stage needs at least one layer")
                if sum(split) != a.layers:
                    raise UserError(f"--layers-per-stage: must sum to --layers ({a.layers}), got {sum(split)}")
                plan = solve.evaluate_split(split, shape, a.lora_rank, prec)
            else:
                plan = solve.optimize(a.layers, a.stages, shape, a.lora_rank, a.cap_growth, prec)
    except ValueError as e:
        flag = "--budget-gb" if a.budget_gb is not None else "--layers-per-stage"
        raise UserError(f"{flag}: {e}")
    if a.extended:
        L = sum(plan.layers_per_stage)
        plan.extended = {
            "embedding_head_norm_bytes": memory.head_state_bytes(a.vocab_size, a.hidden, prec=prec),
            "activation_bytes": activations(L),
            "activation_formula": "steplm's graph, fp32: per token and layer (6d+3q+2kv+4f)*4 + (2+heads)*4 "
                                  "(d*4 with checkpointing, plus one layer); head: d*4 per token + 4*V*d + "
                                  "3 fp32 logits chunks (memory.activation_bytes)",
        }
        i = plan.stage_bytes.index(plan.peak_bytes)  # the largest stage
        depth, before = plan.cumulative_layers[i], plan.cumulative_layers[i] - plan.layers_per_stage[i]
        trainable = plan.layers_per_stage[i] * plan.params_per_layer + before * plan.lora_params_per_layer
        head = plan.extended["embedding_head_norm_bytes"]
        plan.extended["activation_bytes"] = activations(depth)
        grad = 2 if prec.master_weights == "bf16" else 4  # bytes of one gradient element
        head_params = 2 * a.vocab_size * a.hidden + a.hidden
        plan.extended["peak_bytes"] = memory.step_peak_bytes(
            plan.peak_bytes + head, grad * (trainable + head_params), grad * a.vocab_size * a.hidden,
            activations(depth))
    if a.json:
        print(dumps(plan.to_dict()))
        return
    gb, unit = (memory.GB, "GB") if plan.vanilla_bytes >= memory.GB else (1e6, "MB")
    print(f"d={a.hidden} L={sum(plan.layers_per_stage)} K={len(plan.layers_per_stage)} r={a.lora_rank}  "
          f"P={plan.params_per_layer:,} E={plan.lora_params_per_layer:,}  solver: {plan.solver}")
    print(f"optimizer states {plan.optimizer_states}, master weights {plan.master_weights}")
    print(f"{'stage':>5} {'new':>4} {'layers':>6} {unit + ' (Eq. 2)':>11}")
    for i, (n, N, b) in enumerate(zip(plan.layers_per_stage, plan.cumulative_layers, plan.stage_bytes), 1):
        print(f"{i:>5} {n:>4} {N:>6} {b / gb:>11.2f}")
    print(f"peak {plan.peak_bytes / gb:.2f} {unit} vs vanilla {plan.vanilla_bytes / gb:.2f} {unit} "
          f"(reduction {100 * plan.reduction:.1f} %)")
    if plan.tied_optima_truncated:
        print(f"tied optima: more than {len(plan.tied_optima)} (--json lists the first {len(plan.tied_optima)})")
    elif len(plan.tied_optima) > 1:
        print(f"tied optima: {plan.tied_optima}")
    if plan.capped_at_layers:
        print(f"capped: the budget fits at least {plan.capped_at_layers} layers, the planner's bound; "
              f"the plan stops there")
    if plan.extended:
        e = plan.extended
        print(f"extended: embeddings/head/norm states {e['embedding_head_norm_bytes'] / gb:.2f} {unit}, activations "
              f"{e['activation_bytes'] / gb:.2f} {unit}; peak of a training step {e['peak_bytes'] / gb:.2f} {unit}")


def _sampling(a) -> dict:
    if not (math.isfinite(a.temperature) and a.temperature >= 0):
        raise UserError(f"--temperature: must be a finite number >= 0, got {a.temperature}")
    if a.top_p is not None and not 0 < a.top_p <= 1:
        raise UserError(f"--top-p: must be in (0, 1], got {a.top_p}")
    if a.temperature == 0:  # greedy decoding draws nothing: a sampling flag would change nothing
        for flag, value in (("--top-k", a.top_k), ("--top-p", a.top_p), ("--seed", a.seed)):
            if value is not None:
                raise UserError(f"{flag}: has no effect at --temperature 0 (greedy decoding); give --temperature "
                                f"above 0 to sample")
    return {"max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_k": a.top_k,
            "top_p": a.top_p, "seed": a.seed or 0}


def cmd_generate(a):
    from steplm.devices import autocast
    from steplm.io.run_dir import load_model_dir
    from steplm.eval.generate import alpaca_prompt, complete

    if not a.prompt:
        raise UserError("--prompt: give a non-empty prompt")
    sampling = _sampling(a)
    device, dtype = _precision(a)
    m = load_model_dir(a.model, device)
    text = alpaca_prompt(a.prompt) if a.alpaca else a.prompt
    with autocast(device, dtype):
        print(complete(m.model, m.tokenizer, text, m.special, **sampling))


def cmd_info(a):
    from steplm.io.run_dir import describe

    if not Path(a.model).is_dir():
        raise UserError(f"MODEL: {a.model} is not a directory")
    d = describe(a.model)
    if a.json:
        print(dumps(d))
        return
    m = d["model"]
    rope = m["rope_scaling"] or {"rope_type": "default"}
    print(f"{d['kind']}: {m['n_layers']} layers, d {m['d_model']}, {m['n_heads']} heads ({m['n_kv_heads']} kv) "
          f"of {m['head_dim']}, ffn {m['ffn_hidden']}, vocab {m['vocab_size']}, max_seq_len {m['max_seq_len']}, "
          f"rope {rope['rope_type']} theta {m['rope_theta']:g}, tied {m['tie_embeddings']}")
    if d.get("special_tokens"):
        s = d["special_tokens"]
        print(f"eos {s['eos']!r} ({s['eos_id']}), stop ids {s['stop_ids']}, bos id {s['bos_id']}")
    h = d.get("steplm") or {}
    if "layers_per_stage" in h:
        print(f"steplm: method {h.get('method')}, layers per stage {h['layers_per_stage']}, "
              f"steps per stage {h.get('stage_steps')}" + (f", then SFT {h['sft']}" if "sft" in h else ""))
    elif "sft" in h:
        print(f"steplm: SFT {h['sft']}")


# The train.* keys an sft flag sets: a --set of one would silently override (or be overridden by) the flag.
SFT_FLAG_KEYS = {"train.lr": "--lr", "train.warmup_steps": "--warmup-steps", "train.micro_batch": "--micro-batch",
                 "train.grad_accum": "--batch-size", "train.seed": "--seed", "train.device": "--device",
                 "train.dtype": "--dtype", "train.compile": "--compile", "train.checkpoint_every": "--checkpoint-every",
                 "train.max_steps": "--epochs"}
# The train.* keys sft has no use for: it never validates, and cuts each example at MODEL's context.
SFT_UNUSED_KEYS = {"train.eval_every": "sft has no validation split", "train.eval_tokens": "sft has no validation split",
                   "train.seq_len": "each example is cut at MODEL's max_seq_len"}


def _check_sft_sets(sets: list[str]) -> None:
    """sft's --set takes train.* keys only: the model's shape and tokenizer are MODEL's, the examples
    --data's, and the method plain AdamW, so any other key would be ignored without a word."""
    from steplm.config import override_key
    for item in sets:
        key = override_key(item)
        if key in SFT_FLAG_KEYS:
            raise UserError(f"--set {key}: sft sets it from {SFT_FLAG_KEYS[key]}; use that flag")
        if key in SFT_UNUSED_KEYS:
            raise UserError(f"--set {key}: sft does not use it ({SFT_UNUSED_KEYS[key]})")
        if not key.startswith("train."):
            raise UserError(f"--set {key}: sft takes only train.* keys (the model's shape and tokenizer come from "
                            f"MODEL, the examples from --data, and the optimizer is plain AdamW)")


def cmd_sft(a):
    from steplm.train.sft import sft_trainer, read_examples, sft_config
    from steplm.io.run_dir import source_config

    _check_sft_sets(a.set or [])
    read_examples(a.data)  # bad data: one line, before anything is written
    _precision(a)  # --device cuda without a GPU: one line naming the flag
    out = _out_path(a.out, "--out")
    cfg = sft_config(a.model, a.data, source_config(a.model), epochs=a.epochs, limit=a.limit, lr=a.lr,
                     warmup_steps=a.warmup_steps, batch_size=a.batch_size, micro_batch=a.micro_batch, seed=a.seed,
                     device=a.device, dtype=a.dtype, compile=a.compile, checkpoint_every=a.checkpoint_every,
                     world=int(os.environ.get("WORLD_SIZE", "1")), overrides=a.set or [])
    s = _fit(lambda: sft_trainer(cfg, out, progress=not a.quiet), out)
    if s is not None:
        print(dumps({k: s[k] for k in ("examples", "epochs", "steps", "first_loss", "final_loss")}))
        print(f"model written to {out}/ (sft_summary.json, metrics.jsonl, model.safetensors)", file=sys.stderr)


def cmd_mt_bench(a):
    from steplm.devices import autocast
    from steplm.io.run_dir import load_model_dir
    from steplm.eval.generate import mt_bench_answers

    sampling = _sampling(a)
    device, dtype = _precision(a)
    out = Path(a.out)
    if not out.parent.is_dir():
        raise UserError(f"--out: directory {out.parent} does not exist")
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
    with autocast(device, dtype):
        n = mt_bench_answers(m.model, m.tokenizer, a.questions, out, a.model_id or Path(a.model).name, a.limit,
                             progress=True, special=m.special, batch_size=a.batch_size, **sampling)
    print(f"wrote {n} answers to {out}", file=sys.stderr)


def _add_precision(p, dtype_default="auto"):
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the model runs; auto: the GPU when there is one (as train.device)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default=dtype_default,
                   help="compute precision, as train.dtype: bf16 runs under autocast with fp32 weights; "
                        f"auto: bf16 where the device runs it natively (default {dtype_default})")


def _add_sampling(p, max_new=128):
    p.add_argument("--max-new-tokens", type=_positive_int, default=max_new,
                   help=f"tokens to generate at most, capped by the model's context (default {max_new})")
    p.add_argument("--temperature", type=float, default=0.0, help="softmax temperature; 0 = greedy (default)")
    p.add_argument("--top-k", type=_positive_int, help="sample from the k most likely tokens only")
    p.add_argument("--top-p", type=float, help="nucleus sampling: the smallest set of tokens whose "
                   "probability reaches p, in (0, 1]")
    p.add_argument("--seed", type=_seed, help="sampling seed, in [0, 2**32) (default 0; with --temperature > 0)")


def cmd_plot(a):
    from steplm.plots import plot_memory

    out = plot_memory(a.run_dir, a.out, a.vanilla)
    print(f"wrote {out}", file=sys.stderr)


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="steplm", description="STEP: staged parameter-efficient pre-training of LLaMA models.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="pre-train (vanilla or STEP) from a YAML config")
    t.add_argument("config", nargs="?", help="YAML config (see configs/)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.lr=1e-3")
    t.add_argument("--data", help="training data (sets data.path)")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--max-steps", type=_positive_int, help="vanilla-equivalent step budget (train.max_steps)")
    t.add_argument("--seed", type=_seed, help="train.seed")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--fresh", action="store_true", help="refuse to start unless --out is empty (no resume)")
    t.add_argument("--init-from", metavar="HF_DIR", help="start stage 1 from this HF Llama directory and use its "
                   "tokenizer (model.init_from); model.n_layers is the final depth")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="held-out perplexity of a run or HF directory")
    e.add_argument("model", help="run directory or HF Llama directory")
    e.add_argument("--data", help="text file (.txt/.jsonl/.jsonl.gz/.parquet)")
    e.add_argument("--text-field", type=_text,
                   help="the field of .jsonl/.parquet records that holds the text (default text)")
    e.add_argument("--max-tokens", type=_positive_int, help="score at most this many tokens, in whole windows of "
                   "--seq-len (so at least one window)")
    e.add_argument("--seq-len", type=_positive_int, help="window length (default: the model's max_seq_len)")
    e.add_argument("--batch-size", type=_positive_int, default=8, help="windows scored together (default 8)")
    e.add_argument("--backend", choices=["steplm", "transformers"],
                   help="score with steplm's model (default) or with transformers' LlamaForCausalLM")
    e.add_argument("--tasks", help="zero-shot tasks, comma-separated: lambada,arc_easy,arc_challenge,winogrande,"
                                   "piqa,openbookqa,hellaswag")
    e.add_argument("--tasks-dir", help="task files (default $STEPLM_TASKS_DIR or ../shared/data/eval)")
    e.add_argument("--limit", type=_positive_int, help="score only the first N items of each task")
    e.add_argument("--json", action="store_true", help="print one JSON line")
    _add_precision(e, "fp32")  # fp32 is the reference for perplexity and task scores
    e.set_defaults(fn=cmd_eval)

    x = sub.add_parser("export", help="write a Hugging Face Llama directory")
    x.add_argument("run_dir", help="run directory (its merged final model)")
    x.add_argument("--to", required=True, help="output directory")
    x.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weight dtype in the files")
    x.add_argument("--max-shard-size", type=_size, default="5GB",
                   help="split the weights into model-0000i-of-0000n.safetensors shards of at most this size "
                        "(5GB, 500MB, or bytes), with model.safetensors.index.json")
    x.set_defaults(fn=cmd_export)

    inf = sub.add_parser("info", help="what a run or HF directory holds: shape, special tokens, STEP stages")
    inf.add_argument("model", help="run directory or HF Llama directory")
    inf.add_argument("--json", action="store_true", help="print one JSON line")
    inf.set_defaults(fn=cmd_info)

    pl = sub.add_parser("plan", help="STEP memory planner (paper Eq. 1-5, Eq. 3 ILP); with CONFIG, a run's stage plan")
    pl.add_argument("config", nargs="?", help="a run config (YAML): print its stage plan (a dry run of `train`)")
    pl.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (with CONFIG)")
    pl.add_argument("--init-from", metavar="HF_DIR", help="plan STEP from this HF Llama directory (model.init_from)")
    pl.add_argument("--preset", choices=["368m", "680m", "1.2b", "1.2b-3stage"],
                    help="a model size of the paper's Table 1 (its d, L, K and rank)")
    width, big = _int_up_to(solve.MAX_WIDTH), _int_up_to(1 << 30, "a sanity bound")
    pl.add_argument("--hidden", type=width, help="d")
    pl.add_argument("--layers", type=_int_up_to(solve.MAX_LAYERS), help="final layer count L")
    pl.add_argument("--stages", type=_int_up_to(solve.MAX_STAGES), help="K (default 2)")
    pl.add_argument("--lora-rank", type=width, help="r (default min(128, d), the paper's rank)")
    pl.add_argument("--layers-per-stage", help="evaluate this split instead of optimising, e.g. 7,5")
    pl.add_argument("--ffn-hidden", type=width, help="SwiGLU width (default: exactly 8/3·d, the paper's Eq. 4)")
    pl.add_argument("--n-heads", type=width, help="attention heads (for GQA and activations)")
    pl.add_argument("--n-kv-heads", type=width, help="key/value heads (GQA)")
    pl.add_argument("--cap-growth", action="store_true", help="require n_(i+1) <= N_i")
    pl.add_argument("--budget-gb", type=_positive_float, help="deepest model whose peak fits this many GB (1e9 B); "
                    f"stops at {solve.MAX_LAYERS} layers and says so")
    pl.add_argument("--extended", action="store_true", help="add embeddings, head, norms and activations")
    pl.add_argument("--optimizer-states", choices=memory.OPTIMIZER_STATES,
                    help="AdamW moments (default fp32; with --budget-gb and no value: search every supported "
                         "precision, and every K from 1 to %d without --stages)" % solve.MAX_SEARCH_STAGES)
    pl.add_argument("--master-weights", choices=memory.MASTER_WEIGHTS,
                    help="trainable weights and gradients (default fp32, or bf16 with --optimizer-states bf16)")
    pl.add_argument("--vocab-size", type=big, help="V, for embeddings and head (with --extended; "
                    "default 50257, GPT-2's)")
    pl.add_argument("--seq-len", type=big, help="tokens per sequence (activations, with --extended; default 1024)")
    pl.add_argument("--micro-batch", type=big, help="sequences per forward (activations, with --extended; "
                    "default 1)")
    pl.add_argument("--checkpointing", action="store_true", help="activation checkpointing (extended model)")
    pl.add_argument("--json", action="store_true", help="print one JSON object")
    pl.set_defaults(fn=cmd_plan)

    g = sub.add_parser("generate", help="generate text (KV cache; greedy, temperature, top-k, top-p)")
    g.add_argument("model", help="run directory or HF Llama directory")
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--alpaca", action="store_true", help="wrap the prompt in the Alpaca instruction template")
    _add_sampling(g)
    _add_precision(g)
    g.set_defaults(fn=cmd_generate)

    f = sub.add_parser("sft", help="instruction-tune (Alpaca template, loss on responses only)")
    f.add_argument("model", help="run directory or HF Llama directory")
    f.add_argument("--data", required=True, help="Alpaca JSON (instruction/input/output) or seed-task JSONL")
    f.add_argument("--out", required=True, help="run directory of the tuned model")
    f.add_argument("--epochs", type=_positive_int, default=2, help="passes over the data (default 2)")
    f.add_argument("--lr", type=_positive_float, default=1e-4, help="peak AdamW learning rate (default 1e-4)")
    f.add_argument("--warmup-steps", type=_non_negative_int, default=100,
                   help="linear warmup, in optimizer steps, before the cosine decay to 0; at most a tenth of the "
                        "run (default 100)")
    f.add_argument("--batch-size", type=_positive_int, default=8, help="examples per optimizer step")
    f.add_argument("--micro-batch", type=_positive_int,
                   help="examples per forward (gradient accumulation; default --batch-size)")
    f.add_argument("--limit", type=_positive_int, help="use only the first N examples")
    f.add_argument("--seed", type=_seed, default=0, help="seed of the epochs' shuffles, in [0, 2**32) (default 0)")
    f.add_argument("--compile", action="store_true", help="torch.compile the model (as train.compile)")
    f.add_argument("--checkpoint-every", type=_non_negative_int, default=0,
                   help="checkpoint every N steps (0: at the end); rerun the same command to resume")
    f.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any other config key, e.g. train.parallel=fsdp2 under torchrun (repeatable)")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_precision(f)
    f.set_defaults(fn=cmd_sft)

    mb = sub.add_parser("mt-bench", help="answer MT-Bench's two turns; FastChat llm_judge answer format")
    mb.add_argument("model", help="run directory or HF Llama directory")
    mb.add_argument("--questions", required=True, help="question.jsonl")
    mb.add_argument("--out", required=True, help="answers .jsonl")
    mb.add_argument("--model-id", help="model_id in the answer file (default: the model directory's name)")
    mb.add_argument("--limit", type=_positive_int, help="answer only the first N questions")
    mb.add_argument("--batch-size", type=_positive_int, default=8, help="questions generated together")
    _add_sampling(mb, max_new=512)
    _add_precision(mb)
    mb.set_defaults(fn=cmd_mt_bench)

    pt = sub.add_parser("plot", help="Figure 2: memory per stage of a run, as PNG")
    pt.add_argument("run_dir", help="run directory (its summary.json's per-stage memory)")
    pt.add_argument("--vanilla", help="a vanilla run directory to compare against")
    pt.add_argument("--out", help="PNG path (default RUN_DIR/memory.png)")
    pt.set_defaults(fn=cmd_plot)
    for command in sub.choices.values():  # every file or folder argument refuses an empty path
        for action in command._actions:
            if action.dest in PATH_ARGS and action.type is None:
                action.type = _path
            if action.dest in TEXT_ARGS and action.type is None:
                action.type = _text
    return p


def main(argv: list[str] | None = None) -> int:
    from steplm.errors import (EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_TRAINING_STOPPED, EXIT_USER_ERROR, Preempted,
                               TrainingStopped)
    _quiet_library_logs()
    try:
        args = build_parser().parse_args(argv)
        args.fn(args)
    except UserError as e:
        print(f"steplm: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingStopped as e:
        print(f"steplm: stopped: {e}", file=sys.stderr)
        return EXIT_TRAINING_STOPPED
    except Preempted as e:
        print(f"steplm: preempted: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print("steplm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `steplm plan ... | head`: the reader left; stop quietly, as Unix tools do
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    try:
        sys.stdout.flush()  # a buffered tail meeting a closed pipe fails here, not at interpreter exit
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    return 0


def _quiet_library_logs() -> None:
    """Importing transformers imports torchao, which logs a warning per prebuilt CUDA kernel it cannot
    load and per Enum it registers with torch's pytree, and APOLLO's bitsandbytes one for a CPU kernel
    package it lacks: noise around a command's one line of output. Errors still print."""
    import logging
    for name in ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops"):
        logging.getLogger(name).setLevel(logging.ERROR)


EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a process ended by SIGPIPE


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so Python's flush at exit does not raise into a traceback again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
