"""User-facing errors: one clear line, no traceback (the CLI prints them and exits 2)."""


class UserError(Exception):
    """A mistake the user can fix: bad path, bad size, missing backend... The message says what
    was wrong and what to do."""
