"""User-facing errors: one clear line, no traceback (the CLI prints them and exits 2)."""


class UserError(Exception):
    """A mistake the user can fix: bad path, bad size, missing backend... The message says what
    was wrong and what to do."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for a
    one-line UserError that wraps it."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
