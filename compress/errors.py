"""The one exception type for bad input.

A `UserError` is a mistake the user can fix (a wrong path, a missing column, an
impossible spec). The CLI prints its message as one paragraph and exits with status 2,
without a traceback. Anything else is a bug in compress and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: say what is wrong, where, and how to fix it."""

    exit_code = 2


class GateFailed(UserError):
    """A stage checked its own output (parity, accuracy tolerance) and it failed."""

    exit_code = 3
