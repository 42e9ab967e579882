"""User-facing errors: one line that says what is wrong and how to fix it."""


class IndexCacheError(Exception):
    """A bad input or environment problem the user can fix; the CLI prints it as one line and exits 2."""
