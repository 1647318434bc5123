"""Return freed tensor memory to the OS at once (glibc), so peak RSS tracks live tensors.

glibc's malloc keeps freed blocks below its mmap threshold in per-thread heaps for reuse, and
raises that threshold (up to 32 MiB) each time a large block is freed; with ``-j`` worker threads
each keeping its own heap, resident memory then grows with freed tensors nobody uses. Pinning the
threshold at 1 MiB makes every tensor-sized allocation its own mapping, unmapped when freed.
A no-op elsewhere (other C libraries, or when glibc cannot be loaded).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import mmap
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_M_MMAP_THRESHOLD = -3  # mallopt parameter numbers from glibc's <malloc.h>
_THRESHOLD = 1 << 20


@functools.cache
def release_freed_tensors() -> bool:
    """Set the mmap threshold once per process; True where it took effect."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD))
    except (OSError, AttributeError):
        return False


HUGE_MIN = 4 << 20  # smaller buffers come from torch's allocator


def empty(nbytes: int) -> torch.Tensor:
    """A fresh uint8 CPU tensor of ``nbytes``; a large one in its own anonymous mapping advised
    for transparent huge pages.

    Each large tensor is a fresh mapping (see ``release_freed_tensors``), and filling one 4 KiB
    page at a time costs a page fault per page: touching fresh memory ran at 0.5–1 GB/s here,
    slower than reading a cached file into it. With 2 MiB pages (``MADV_HUGEPAGE``; the usual
    ``transparent_hugepage=madvise`` setting honours it) it ran 3–8× faster. The mapping is
    unmapped when the tensor is freed, as before. Falls back to ``torch.empty`` where ``mmap``
    cannot advise.
    """
    import torch

    if nbytes < HUGE_MIN or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(nbytes, dtype=torch.uint8)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):
        region.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(region, dtype=torch.uint8)  # keeps ``region`` alive


def empty_like(
    t: torch.Tensor, dtype: torch.dtype | None = None, device: str | None = None
) -> torch.Tensor:
    """An uninitialised tensor shaped like ``t``, on ``device`` (default: ``t``'s); a CPU one
    from ``empty``."""
    import torch

    dtype = dtype or t.dtype
    target = torch.device(device) if device is not None else t.device
    if target.type != "cpu":
        return torch.empty(t.shape, dtype=dtype, device=target)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return empty(t.numel() * itemsize).view(dtype).view(t.shape)


_PAGE = mmap.PAGESIZE


def forget_pages(t: torch.Tensor, start: int, stop: int) -> None:
    """Let go of the whole pages holding entries ``[start, stop)`` of ``t``, a contiguous CPU
    tensor of our own mapped from a file (``TensorFile.map``) that will not read those entries
    again: ``MADV_DONTNEED`` drops them from this process's resident memory (the page cache
    keeps them; a later read would fault them in again from the file). A tensor read into fresh
    memory instead (``map``'s fallback) loses those entries' values: only for ranges never read
    again. Does nothing where ``madvise`` is not available.

    Mapped pages count as the process's own resident memory while mapped: a fuse that reads one
    tensor of every source at once would hold each source's whole tensor resident without this.
    """
    if _MADVISE is None or t.device.type != "cpu" or stop <= start:
        return
    size = t.element_size()
    lo = t.data_ptr() + start * size
    hi = t.data_ptr() + stop * size
    lo = -(-lo // _PAGE) * _PAGE  # whole pages only: the neighbours may still be read
    hi -= hi % _PAGE
    if hi > lo:
        _MADVISE(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), mmap.MADV_DONTNEED)


def _madvise() -> object | None:
    if not hasattr(mmap, "MADV_DONTNEED"):
        return None
    try:  # the process's own symbols (libc's among them): no library search at import
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise()


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Python's cyclic collector off while the caller allocates many short-lived, acyclic
    objects (tensor views per piece): each full pass walks every object torch and transformers
    made at import, and in the streamed fuse at 3 GB those passes took ~8% of the step
    (docs/PERFORMANCE.md). Reference counting still frees everything the caller drops; only
    cycles wait for the collector, which runs again afterwards. Nests: the outermost restores."""
    import gc

    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
