"""What building one node cost: its peak resident memory and, on a GPU, its peak GPU memory.

Peak RSS is per node, not per process: on Linux the kernel's high-water mark (VmHWM) is reset
before the step (``/proc/self/clear_refs``, value 5) and read after it. Where that cannot be
reset, the process's peak so far is reported instead (an upper bound), flagged ``rss_scope``.
The GPU's peak comes from torch's allocator statistics, read only when torch is loaded already
(build/ does not import torch).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _process_peak() -> int | None:
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return peak if sys.platform == "darwin" else peak * 1024


def _cuda(device: str) -> Any:
    torch = sys.modules.get("torch")
    if not device.startswith("cuda") or torch is None:
        return None
    try:
        return torch.cuda if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    except Exception:
        return None


@contextmanager
def measured(device: str) -> Iterator[dict[str, Any]]:
    """Yields a dict filled, on exit, with ``peak_rss`` (bytes), ``rss_scope`` ("node" or
    "process") and, on a GPU, ``peak_gpu`` (bytes allocated at most)."""
    stats: dict[str, Any] = {}
    node_scope = _reset_hwm()
    cuda = _cuda(device)
    if cuda is not None:
        cuda.reset_peak_memory_stats()
    try:
        yield stats
    finally:
        peak = _vm_hwm() if node_scope else None
        stats["peak_rss"] = peak if peak is not None else _process_peak()
        stats["rss_scope"] = "node" if peak is not None else "process"
        cuda = cuda or _cuda(device)  # the step may have been the first to touch the GPU
        if cuda is not None:
            stats["peak_gpu"] = int(cuda.max_memory_allocated())


def tree_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of the regular files under ``path`` (what a node wrote)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            with suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total
