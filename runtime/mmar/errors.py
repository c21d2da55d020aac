"""The one exception type a user sees: a readable message naming the file and field at fault."""


class MMARError(Exception):
    """A user-facing error (bad input, bad config, missing files). The CLI prints it and exits 1."""
