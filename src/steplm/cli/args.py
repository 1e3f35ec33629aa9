"""What every steplm command shares: the parser class, argument types, output folders, device and
precision flags, and running a trainer."""
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

from steplm.config.validate import is_plain_int
from steplm.errors import UserError, warn


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # --warmup is not silently --warmup-steps
        super().__init__(*args, **kwargs)
        # A value that starts with '-' and a digit or '.' is a (bad) value, not an unknown option:
        # argparse's own test takes only plain negative numbers, so '--lr -1e-3' or
        # '--max-shard-size -5GB' said "expected one argument" instead of what is wrong with the value.
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)  # for error()'s hints
        return super().parse_known_args(args, namespace)

    def error(self, message):  # one line, exit 2 (argparse prints usage + error otherwise)
        if "arguments are required: cmd" in message:  # `steplm` alone; 'cmd' is an internal name
            raise UserError(f"give a subcommand: {', '.join(self._subcommands())} (steplm --help says what each does)")
        message = message.replace("argument cmd: invalid choice", "unknown subcommand")
        if message.startswith("unrecognized arguments: "):
            message += self._hint(message.split(": ", 1)[1].split()[0])
        where = self.prog.removeprefix("steplm").strip()  # main() prints the 'steplm: error:' prefix
        raise UserError(f"{where}: {message}" if where else message)

    def _hint(self, token: str) -> str:
        """What an unrecognized argument probably meant: the value of a `--set KEY VALUE` (which takes
        KEY=VALUE), or a flag of this command spelled alike (--train.lr for --train.lrr, --lr)."""
        import difflib

        argv = getattr(self, "_argv", [])
        for i, t in enumerate(argv[:-1]):
            if argv[i + 1] == token and i and argv[i - 1] == "--set" and "=" not in t:
                return f" (--set takes KEY=VALUE: --set {t}={token}, or --{t} {token})"
        if not token.startswith("-"):
            return ""
        parser = self
        for t in argv:  # unrecognized arguments surface at the top parser: take the subcommand's options
            if t in self._subparser_map():
                parser = self._subparser_map()[t]
                break
        name = token.split("=", 1)[0]
        options = [o for o in parser._option_string_actions if o.startswith("--") and o != "--help"]
        word = name.lstrip("-").replace("-", "_")
        last = {o: o.lstrip("-").split(".")[-1].replace("-", "_") for o in options}
        close = [o for o in options if last[o] == word]  # --lr: --train.lr
        close += [o for o in options if len(word) >= 4 and last[o].startswith(word) and o not in close]  # --warmup
        close += [o for o in difflib.get_close_matches(name, options, n=2, cutoff=0.75) if o not in close]
        return f" (did you mean {' or '.join(close[:2])}?)" if close else ""

    def _subparser_map(self) -> dict:
        return {name: p for action in self._actions if isinstance(action, argparse._SubParsersAction)
                for name, p in action.choices.items()}

    def _subcommands(self) -> list[str]:
        return [name for action in self._actions if isinstance(action, argparse._SubParsersAction)
                for name in action.choices]


def path_arg(s: str) -> str:
    """An argparse type for file and folder arguments: an empty path would silently mean '.'."""
    if not s.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    if "\0" in s:
        raise argparse.ArgumentTypeError("a path cannot hold a NUL character")
    return s


def split_arg(s: str) -> list[int]:
    """An argparse type for a layer split such as '7,5': comma-separated whole numbers written in
    ASCII digits, returned as a list (their count, sum and sizes are checked by the plan). An empty
    value would otherwise read as 'not given'; Python's int() would also take '+2', '7_0' and '٣'."""
    if not s.strip():
        raise argparse.ArgumentTypeError("expected the layers of each stage, comma-separated (e.g. 7,5), "
                                         "got an empty string")
    items = [x.strip() for x in s.split(",")]
    if not all(is_plain_int(x) and not x.startswith("-") for x in items):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (e.g. 7,5), got {s!r}")
    return [int(x) for x in items]


def text_arg(s: str) -> str:
    """An argparse type for text that is tokenized or written into JSON/YAML: bytes that are not UTF-8
    arrive from the shell as lone surrogates, which no tokenizer or UTF-8 file can take."""
    if not is_utf8(s):
        raise argparse.ArgumentTypeError("is not valid UTF-8 text")
    return s


def name_arg(s: str) -> str:
    """An argparse type for a name such as a record field: UTF-8 text that is not empty (an empty
    value would otherwise read as 'not given' and fall back to the default)."""
    if not s.strip():
        raise argparse.ArgumentTypeError("expected a name, got an empty string")
    return text_arg(s)


def is_utf8(s: str) -> bool:
    """Whether ``s`` encodes as UTF-8: undecodable argv bytes arrive as lone surrogates, which do not."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


MODEL_HELP = ("a model: an HF Llama folder, a steplm run folder (its final model; a run still training or "
              "interrupted: its newest intact checkpoint), a checkpoint folder (RUN/checkpoints/step_N), or "
              "RUN/checkpoints (the newest intact one); read-only")

TEXT_ARGS = {"prompt", "model_id", "set", "tasks"}
PATH_ARGS = {"config", "data", "out", "to", "init_from", "model", "run_dir", "questions", "vanilla", "tasks_dir"}


def _integer(s) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}")


def positive_int(s) -> int:
    """An argparse type: an integer > 0."""
    v = _integer(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return v


def non_negative_int(s) -> int:
    """An argparse type: an integer >= 0."""
    v = _integer(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be non-negative, got {v}")
    return v


def every_arg(s):
    """An argparse type for an interval that may be 'auto': a non-negative int, or 'null' (the
    config's value for auto) for auto or null."""
    return "null" if s.strip().lower() in ("auto", "null") else non_negative_int(s)


def int_up_to(limit: int, what: str = "the planner's bound"):
    """An argparse type: a positive integer of at most ``limit``."""
    def parse(s):
        v = positive_int(s)
        if v > limit:
            raise argparse.ArgumentTypeError(f"must be at most {limit} ({what}), got {v}")
        return v
    return parse


def positive_float(s) -> float:
    """An argparse type: a finite number > 0."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}")
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {s}")
    return v


def seed_arg(s) -> int:
    """An argparse type: a seed in [0, 2**32)."""
    v = _integer(s)
    if not 0 <= v < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {v}")
    return v


# ---------------------------------------------------------------------------- subcommands
def fit(make_trainer, out: Path) -> dict | None:
    """Build a trainer and fit it; the summary on rank 0 (None on the other ranks). A run that fails
    to start (bad input found before it wrote anything but its lock) leaves no directory it created
    behind; once it has written its config, metrics or a checkpoint, nothing it wrote is removed,
    however it ends (an error, a stop, an interrupt)."""
    from steplm.train import distributed
    from steplm.train.guards import RunDirInUse, holds_run_files

    created = first_missing(out)  # --out a/b/run may create a and a/b as well
    trainer, fitted = None, False
    try:
        trainer = make_trainer()
        summary = trainer.fit()
        fitted, is_main = True, trainer.main
        distributed.barrier()  # no rank tears the group down while another still uses it
    except BaseException as e:
        # A failed start leaves nothing behind; a run that began keeps all it wrote, and a folder
        # another run holds is never touched (nor one whose run this rank finished, when only the
        # closing barrier failed).
        if created and not fitted and not isinstance(e, RunDirInUse) and not holds_run_files(out):
            remove_created(out, created)
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


def out_path(given: str, flag: str) -> Path:
    """An output folder's path with 'a/../b' folded to 'b' (as the user means it): mkdir would
    otherwise create a as well, a folder nobody asked for. A path that is not UTF-8 is refused before
    any work: the tokenizers library writes tokenizer.json only through UTF-8 paths."""
    if not is_utf8(given):
        raise UserError(f"{given.encode('utf-8', 'surrogateescape')!r} is not a UTF-8 path; the tokenizer "
                        f"files cannot be written there, choose another name", key=flag)
    return Path(os.path.normpath(given))


def first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet: what creating it
    would create. None when ``path`` exists."""
    path, top = path.absolute(), None
    while not path.exists() and path != path.parent:
        path, top = path.parent, path
    return top


def remove_created(out: Path, top: Path) -> None:
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


def precision(a):
    """(torch.device, torch.dtype) from --device and --dtype, with train.device/train.dtype's meaning."""
    from steplm.devices import pick_device, pick_dtype

    device = pick_device(a.device, "--device")
    return device, pick_dtype(a.dtype, device)


def add_precision(p, dtype_default="auto"):
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the model runs; auto: the GPU when there is one (as train.device)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default=dtype_default,
                   help="compute precision, as train.dtype: bf16 runs under autocast with fp32 weights; "
                        f"auto: bf16 where the device runs it natively (default {dtype_default})")


# -- config keys as flags -----------------------------------------------------------------------------
# The short flags of the config keys that train and plan share (sft has its own, with the same names
# for the same keys): flag -> (key, argparse keywords).
SHORT_FLAGS = {
    "--data": ("data.path", {"type": path_arg, "help": "training data: a file, a folder of them, or a HF dataset name (data.path)"}),
    "--max-steps": ("train.max_steps", {"type": positive_int, "help": "vanilla-equivalent step budget (train.max_steps)"}),
    "--lr": ("train.lr", {"type": positive_float, "help": "peak learning rate (train.lr)"}),
    "--seed": ("train.seed", {"type": seed_arg, "help": "seed of init, data order and adapters (train.seed)"}),
    "--micro-batch": ("train.micro_batch", {"type": positive_int, "help": "sequences per forward (train.micro_batch)"}),
    "--grad-accum": ("train.grad_accum", {"type": positive_int, "help": "micro-batches per optimizer step (train.grad_accum)"}),
    "--warmup-steps": ("train.warmup_steps", {"type": non_negative_int, "help": "linear warmup steps (train.warmup_steps)"}),
    "--checkpoint-every": ("train.checkpoint_every", {"type": every_arg, "help": "checkpoint every N steps "
                                                      "(train.checkpoint_every; auto: about every tenth of the run, "
                                                      "the default; 0: never)"}),
    "--device": ("train.device", {"choices": ["auto", "cpu", "cuda"], "help": "where the run trains (train.device)"}),
    "--dtype": ("train.dtype", {"choices": ["auto", "fp32", "bf16"], "help": "compute precision (train.dtype)"}),
    "--compile": ("train.compile", {"action": "store_true", "default": None, "help": "torch.compile (train.compile)"}),
    "--init-from": ("model.init_from", {"type": path_arg, "metavar": "MODEL", "help": "start stage 1 from this model "
                                        "(an HF Llama folder, a steplm run, a checkpoint folder or RUN/checkpoints) "
                                        "and use its tokenizer (model.init_from); model.n_layers is the final depth"}),
}


def add_config_flags(p, short: dict = SHORT_FLAGS, sections: tuple[str, ...] | None = None,
                     exclude: tuple[str, ...] = ()) -> None:
    """--set KEY=VALUE, the ``short`` flags, and every config key (of ``sections``, default all) as
    --section.key VALUE, its help the field's docstring in the schema."""
    from steplm.config.schema import dotted_fields, field_docs

    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.lr=1e-3 "
                   "(repeatable; the same as --train.lr 1e-3)")
    for flag, (key, kw) in short.items():
        p.add_argument(flag, dest=flag_dest(flag), **kw)
    group = p.add_argument_group("config keys", "every key of the run config, as --section.key VALUE (or "
                                 "--section.key=VALUE); configs/*.yaml show them in context")
    for key, (cls, f) in dotted_fields().items():
        if key == "method" or (sections and key.split(".")[0] not in sections) or key in exclude:
            continue
        kind = "true or false" if f.type in ("bool", bool) else "VALUE"
        group.add_argument(f"--{key}", dest=f"cfg:{key}", metavar=kind.split()[0].upper() if kind != "VALUE" else "VALUE",
                           nargs="?" if kind != "VALUE" else None, const="true" if kind != "VALUE" else None,
                           help=" ".join(field_docs(cls).get(f.name, "").split()))
    if sections is None:
        group.add_argument("--method", dest="cfg:method", metavar="NAME", help="the method (vanilla, step, step-no-pet, "
                           "relora, galore, apollo)")


def same_value(a, b) -> bool:
    """Whether two values of one key, as given on the command line (text or parsed), are the same:
    equal as text (case aside: true, True), or as numbers (3e-4 and 0.0003)."""
    if str(a).strip().lower() == str(b).strip().lower():
        return True
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def flag_dest(flag: str) -> str:
    return "short:" + flag.lstrip("-")


def config_overrides(a, short: dict = SHORT_FLAGS) -> list[str]:
    """The config overrides of a command's flags: --set items, the short flags and the --section.key
    flags given, as KEY=VALUE items; a key given two ways is refused. Sets ``a.names``: each key given
    by a flag -> that flag, the name errors show it under."""
    from steplm.config import override_key

    items, given, values = [], {}, {}
    a.names = getattr(a, "names", {})

    def add(key, value, how):
        if key in given:
            first, second = (how, given[key]) if given[key].startswith("--set") else (given[key], how)
            if same_value(values[key], value):  # redundant, not contradictory: said, and the run goes on
                warn(f"{first}: also given as {second}, with the same value; give it once")
                return
            raise UserError(f"{first}: also given as {second}; give one of them")
        given[key], values[key] = how, value
        items.append(f"{key}={value}")
        if not how.startswith("--set"):
            a.names[key] = how

    for item in getattr(a, "set", None) or []:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=3e-4 (or --train.lr 3e-4)")
        key = override_key(item)
        if key in given and given[key].startswith("--set"):
            items.append(item)  # config.load says what is wrong with a key set twice
            continue
        add(key, item.split("=", 1)[1], f"--set {key}")
    for flag, (key, _) in short.items():
        value = getattr(a, flag_dest(flag), None)
        if value is not None:
            add(key, str(value).lower() if isinstance(value, bool) else value, flag)
    for dest, value in vars(a).items():
        if dest.startswith("cfg:") and value is not None:
            add(dest[4:], value, f"--{dest[4:]}")
    return items
