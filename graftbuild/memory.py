"""Return freed tensor memory to the OS at once (glibc), so peak RSS tracks live tensors.

glibc's malloc keeps freed blocks below its mmap threshold in per-thread heaps for reuse, and
raises that threshold (up to 32 MiB) each time a large block is freed; with ``-j`` worker threads
each keeping its own heap, resident memory then grows with freed tensors nobody uses. Pinning the
threshold at 1 MiB makes every tensor-sized allocation its own mapping, unmapped when freed.
A no-op elsewhere (other C libraries, or when glibc cannot be loaded).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

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
