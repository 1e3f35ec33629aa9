"""The steplm command line: the command table, and the one place where errors become one line and an exit code.
Each command lives in its own module (``train_cmd.py``, ...): it parses its arguments and calls the library."""
from __future__ import annotations

import argparse
import os
import sys

from steplm.cli import eval_cmd, export_cmd, generate_cmd, plan_cmd, plot_cmd, sft_cmd, train_cmd
from steplm.cli.args import PATH_ARGS, TEXT_ARGS, Parser, path_arg, text_arg
from steplm.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="steplm", description="STEP: staged parameter-efficient pre-training of LLaMA models.")
    p.add_argument("--version", action="version", version=f"steplm {version()}")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    for command in (train_cmd, eval_cmd, export_cmd, plan_cmd, generate_cmd, sft_cmd, plot_cmd):
        command.add_parsers(sub)
    for command in sub.choices.values():  # every file or folder argument refuses an empty path
        for action in command._actions:
            if action.dest in PATH_ARGS and action.type is None:
                action.type = path_arg
            if action.dest in TEXT_ARGS and action.type is None:
                action.type = text_arg
    return p


def version() -> str:
    """The installed package's version (importlib.metadata), else the source tree's ``steplm.__version__``."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("steplm")
    except PackageNotFoundError:  # run from a source tree (PYTHONPATH=src) without installing
        from steplm import __version__
        return __version__


def main(argv: list[str] | None = None) -> int:
    from steplm.errors import (EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_TRAINING_STOPPED, EXIT_USER_ERROR, Interrupted,
                               Preempted, TrainingStopped)
    _quiet_library_logs()
    args = None
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
        args.fn(args)
    except UserError as e:  # each key under the name the user gave it (a.names: --lr for train.lr, ...)
        print(f"steplm: error: {e.render(getattr(args, 'names', None))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingStopped as e:
        print(f"steplm: stopped: {e}", file=sys.stderr)
        return EXIT_TRAINING_STOPPED
    except Preempted as e:  # Interrupted (SIGINT) too: a checkpoint is written, say how to go on from it
        how = "interrupted" if isinstance(e, Interrupted) else "preempted"
        print(f"steplm: {how}: {e}; resume with: {resume_command(argv)}", file=sys.stderr)
        return EXIT_INTERRUPTED if isinstance(e, Interrupted) else EXIT_PREEMPTED
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


def resume_command(argv: list[str]) -> str:
    """The command line that resumes a stopped run: this one, less --fresh (which refuses the folder
    the run has written), quoted for a POSIX shell."""
    import shlex
    return shlex.join(["steplm", *(a for a in argv if a != "--fresh")])


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
