"""The exceptions the CLI turns into a single line and a distinct exit code.

Exit codes: 0 finished; 2 bad input (``UserError``); 3 training stopped on a numerical fault, the
last good checkpoint kept and no final model written (``TrainingStopped``); 75 stopped by SIGTERM or
SIGUSR1 after writing a checkpoint, rerun the same command to resume (``Preempted``; 75 is
sysexits' EX_TEMPFAIL, "try again later"); 130 interrupted (Ctrl-C; during training, after writing a
checkpoint as on SIGTERM: ``Interrupted``). Anything else is a bug.
"""

import re
import sys

EXIT_USER_ERROR = 2
EXIT_TRAINING_STOPPED = 3
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """Bad input: what is wrong, and the key to change.

    ``key`` is what the problem is about: a config key (``train.lr``), or a role such as ``MODEL``
    (the folder a model comes from) or ``--out``; None when the message names it itself.
    ``problems`` holds several (key, message) pairs, for a config with several problems. The command
    line shows each key under the name the user gave it (``--lr`` for train.lr typed as --lr,
    ``RUN_DIR`` for export's MODEL): ``render(names)``."""

    def __init__(self, message: str = "", key: str | None = None, problems: list[tuple[str | None, str]] | None = None):
        self.problems = list(problems) if problems else [(key, message)]
        super().__init__(self.render())

    @property
    def key(self) -> str | None:
        return self.problems[0][0]

    def render(self, names: dict[str, str] | None = None) -> str:
        """One line: each problem as '<key>: <message>', the key renamed by ``names``, and so is each
        key of ``names`` that a message cites ("needs train.master_weights" reads "needs --master-weights"
        where that flag set it; never inside a flag or after ``--set``)."""
        names = names or {}
        if not names:
            return "; ".join(f"{k}: {m}" if k else m for k, m in self.problems)
        cited = re.compile(r"(?<![\w.-])(?<!--set )(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True)))
                           + r")(?![\w])")

        def rename(text: str) -> str:
            return cited.sub(lambda m: names[m.group(1)], text)

        return "; ".join(f"{names.get(k, k)}: {rename(m)}" if k else rename(m) for k, m in self.problems)

    def __str__(self) -> str:
        return self.render()

    def rekeyed(self, key: str, old: str | None = None) -> "UserError":
        """The same error about ``key`` instead of ``old`` (default: its own first key), e.g. a model
        folder's problem reported under model.init_from."""
        old = self.key if old is None else old
        return type(self)(problems=[(key if k == old else k, m) for k, m in self.problems])


class TrainingStopped(Exception):
    """Training stopped on a numerical fault (bad batches, non-finite weights); the last good checkpoint is kept."""


class Preempted(Exception):
    """A preemption signal arrived; the run wrote a checkpoint of its last whole step and stopped.
    The message says which signal, after which step, and the checkpoint's folder."""


class Interrupted(Preempted):
    """SIGINT (Ctrl-C) during training: stopped as on preemption, but exit code 130."""


def warn(message: str) -> None:
    """One line on stderr, "steplm: warning: <message>": something harmless or redundant the run goes on with."""
    print(f"steplm: warning: {message}", file=sys.stderr)
