"""The one exception type a user is meant to read."""


class NbglmError(Exception):
    """A user-facing error: one line saying what is wrong and how to fix it (CLI exit code 2)."""
