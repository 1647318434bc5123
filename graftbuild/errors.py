"""Errors with an exit code: user errors (2) and build failures (1).

Anything a user can fix (a recipe value, a path, a file that is not what it should be) raises
``UserError``; a step that fails while building raises ``BuildError``. The CLI prints the message
as one line and exits with the code; ``--debug`` shows the traceback.
"""

import errno


class GraftbuildError(Exception):
    exit_code = 1
    node: str | None = None
    """The node that was being built or visited when it happened, when known."""
    result: object | None = None
    """A failed build's partial result (``build.results.MakeResult``): what did finish."""


class UserError(GraftbuildError):
    """Bad input: the recipe, a path, a model folder. Exit code 2."""

    exit_code = 2


class BuildError(GraftbuildError):
    """A step failed while building. Exit code 1."""

    exit_code = 1


def named(node_id: str, error: GraftbuildError) -> GraftbuildError:
    """``error`` with its message starting with the node it happened in, and ``node`` set."""
    message = str(error)
    if message.startswith(f"{node_id}:") or f": {node_id}:" in message:
        renamed = error
    else:
        renamed = type(error)(f"{node_id}: {message}")
        renamed.__cause__ = error.__cause__
    renamed.node = error.node or node_id
    return renamed


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def describe_os_error(e: OSError) -> str:
    """One line for a failed file operation, naming the file when known."""
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in NO_SPACE:
        return (
            f"no space left to write{where}: {e.strerror}; the cache keeps only complete "
            "objects, so free some space (or point --cache elsewhere) and run make again"
        )
    return f"{e.strerror or e}{where}"
