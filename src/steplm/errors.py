"""The exceptions the CLI turns into a single line and a distinct exit code.

Exit codes: 0 finished; 2 bad input (``UserError``); 3 training stopped on a numerical fault, the
last good checkpoint kept and no final model written (``TrainingStopped``); 75 stopped by SIGTERM or
SIGUSR1 after writing a checkpoint, rerun the same command to resume (``Preempted``; 75 is
sysexits' EX_TEMPFAIL, "try again later"); 130 interrupted (Ctrl-C). Anything else is a bug.
"""

EXIT_USER_ERROR = 2
EXIT_TRAINING_STOPPED = 3
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """Bad input: the message says what is wrong and which key or flag to change."""


class TrainingStopped(Exception):
    """Training stopped on a numerical fault (bad batches, non-finite weights); the last good checkpoint is kept."""


class Preempted(Exception):
    """A preemption signal arrived; the run wrote a checkpoint at the end of its current step and stopped."""
