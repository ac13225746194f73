"""Error types that decide the exit code: bad input is the user's to fix (exit 2)."""


class UserError(Exception):
    """Bad input or usage: reported as one line on stderr, exit code 2."""


class InternalError(Exception):
    """A bug or an unexpected failure inside nmcompile: exit code 1."""
