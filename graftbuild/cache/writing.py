"""Output files written in one sequential pass: hashed as they are written and flushed to disk
behind the writer.

A step's large outputs (SkillPacks, fused model shards) used to be written, fsynced, and then read
back in full to hash them into the cache. :class:`HashedWriter` hashes (xxh3-128, the store's
hash) exactly the bytes it hands to ``write(2)``, in file order from offset 0, so after closing the
file its hash is known (``hashing.note_written`` records it with the file's stat signature, and
committing the object uses it instead of reading the file: ``hashing.hash_written``).

With ``--fsync`` (immediate durability, graftbuild/durability.py) it also asks the kernel to
start writing each ``FLUSH_EVERY`` bytes to disk as soon as they are written
(``sync_file_range(SYNC_FILE_RANGE_WRITE)``, Linux; elsewhere nothing), so the disk works while
the next tensors are computed and the ``fsync`` that makes the object durable before it is
renamed into the store waits only for the last few megabytes instead of the whole file. By
default (deferred) it does not: starting writeback makes each ``write`` wait for the disk's
queue, and writing 3 GB took 5.6 s with it against 2.5 s without (the kernel's own writeback then
runs behind the build, as it does for any program's output).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from pathlib import Path
from typing import Any

import xxhash

from graftbuild.cache.durability import fsync_objects
from graftbuild.cache.hashing import note_written

FLUSH_EVERY = 32 << 20
WRITE_PIECE = 1 << 20
"""Bytes hashed then written at a time: within a core's L2 cache. Writing 655 MB of 131 MB
tensors took a median 1.09 s in one piece each against 0.49 s in 1 MiB pieces (5 runs each,
loaded machine; docs/PERFORMANCE.md)."""
_SYNC_FILE_RANGE_WRITE = 2  # from <fcntl.h>: start writeback of dirty pages, do not wait


_FALLOC_FL_KEEP_SIZE = 1  # from <linux/falloc.h>: allocate blocks, leave the file's size alone


@functools.cache
def _libc_function(name: str, argtypes: tuple[Any, ...]) -> Any:
    """A libc function (Linux), or None."""
    lib = ctypes.util.find_library("c")
    if not lib or not hasattr(os, "sched_getaffinity"):  # a cheap "is this Linux" test
        return None
    try:
        fn = getattr(ctypes.CDLL(lib, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


def _sync_file_range() -> Any:
    return _libc_function(
        "sync_file_range", (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    )


def reserve(fd: int, size: int) -> None:
    """Allocate ``size`` bytes of disk blocks for a file about to be written, without changing
    its size (Linux ``fallocate`` with ``FALLOC_FL_KEEP_SIZE``). Best effort: a filesystem that
    cannot (or a full disk, which the writes then report) is left as it is. Buffered writes
    into blocks allocated up front ran several times faster here than into delayed allocation
    (2 GB from memory on ext4: see docs/PERFORMANCE.md)."""
    fn = _libc_function("fallocate", (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64))
    if fn is not None and size > 0:
        fn(fd, _FALLOC_FL_KEEP_SIZE, 0, size)


class HashedWriter:
    """Writes a new file sequentially from offset 0, hashing every byte written."""

    def __init__(
        self, path: str | os.PathLike[str], fd: int | None = None, size: int | None = None
    ) -> None:
        """Opens ``path`` for writing (created or truncated), or takes ownership of ``fd``, an
        empty file already open for writing (from ``mkstemp``). ``size``: the bytes the file
        will have, when known, to allocate its blocks up front (``reserve``)."""
        self.path = Path(path)
        self._fd = (
            os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666) if fd is None else fd
        )
        self._hash = xxhash.xxh3_128()
        self.size = 0
        self._flushed = 0  # bytes already handed to writeback
        self._reserved = size or 0
        if size:
            reserve(self._fd, size)

    def fileno(self) -> int:
        return self._fd

    def write(self, data: Any) -> None:
        """Write all of ``data`` (any object exposing a buffer: bytes, a numpy array), in pieces
        of ``WRITE_PIECE`` bytes, each hashed and then written while it is still in the CPU's
        cache (one pass over memory instead of two for a tensor larger than the cache)."""
        whole = memoryview(data).cast("B")
        for lo in range(0, len(whole), WRITE_PIECE):
            view = whole[lo : lo + WRITE_PIECE]
            self._hash.update(view)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
                self.size += n
        if self.size - self._flushed >= FLUSH_EVERY and fsync_objects():
            fn = _sync_file_range()
            if fn is not None:
                fn(self._fd, self._flushed, self.size - self._flushed, _SYNC_FILE_RANGE_WRITE)
            self._flushed = self.size

    @property
    def digest(self) -> str:
        return self._hash.hexdigest()

    def sync(self) -> None:
        """Wait until the file's bytes are on disk (callers ask ``durability.fsync_objects()``)."""
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            if self.size < self._reserved:  # written short (an error): free the blocks past it
                os.ftruncate(self._fd, self.size)
            os.close(self._fd)
            self._fd = -1

    def record(self) -> None:
        """Record the hash for the store (call once the file is closed and at its final path)."""
        note_written(self.path, self.digest)
