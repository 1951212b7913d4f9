"""The one error type for bad input.

Anything the user handed us (a case file, a run directory, a baseline, a command-line value, a
cache or checkpoint on disk) that cannot be used raises an InputError subclass with one line:
`WHERE: KEY: what is wrong; allowed: ...`. The outermost layer (the CLI, the pytest plugin)
turns it into exit code 2 / a usage error. Exit code 1 is kept for numerics that failed to
match, or a run that failed; never for malformed input.
"""


class InputError(ValueError):
    """Bad input: printed as one line, exit code 2, nothing run or written."""

    def __init__(self, message: str):
        # One line, always: a newline from a hostile name must not forge a second message line.
        super().__init__(" ".join(str(message).split("\n")))


def one_line(e: Exception) -> str:
    """An error found after a run began, as one line for a verdict: an OSError as `file: reason`, anything
    else by the first line of its message."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return (str(e).splitlines() or [type(e).__name__])[0]
