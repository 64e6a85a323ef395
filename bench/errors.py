"""One exception type for bad input, so the entry point can print one line instead of a traceback."""


class BenchError(Exception):
    """A problem with the user's configuration or files, explained in one line."""
