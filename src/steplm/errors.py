"""The one exception type that the CLI turns into a single line and exit code 2."""


class UserError(Exception):
    """Bad input: the message says what is wrong and which key or flag to change."""
