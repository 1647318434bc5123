"""Opening files graftbuild reads: regular files only (the lowest module of the cache layer)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from graftbuild.errors import UserError

_KINDS = (
    (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
)  # fmt: skip


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words (for error messages)."""
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def open_regular(path: str | Path) -> int:
    """A read-only descriptor of ``path``, which must be a regular file (links followed).

    The one door through which graftbuild opens a file it reads: a FIFO would block the open
    (``make`` hung), a device would stream forever, a folder fails with a confusing error. The
    open is non-blocking, so a FIFO is refused instead of waited on; a UserError names the path.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except IsADirectoryError:
        raise UserError(f"{path}: expected a file, found a folder") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UserError(
            f"{path}: expected a regular file, found {file_kind(st.st_mode)}; "
            "graftbuild reads only regular files"
        )
    if hasattr(os, "O_NONBLOCK"):
        os.set_blocking(fd, True)
    return fd
