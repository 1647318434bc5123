"""The streamed fuse: base ⊕ Σ wᵢ (sourceᵢ − base) for a sum of reference packs (the lossless
pipeline), computed and written piece by piece with nothing tensor-sized in memory.

The tensor-by-tensor fuse filled one fresh, tensor-sized float32 buffer per tensor and handed it
to the writer. On this project's machines touching fresh memory is the slowest thing the fuse
does (a fresh page costs a fault, and on a virtual machine often a fault in the host too:
0.4–1 GB/s), so here every piece is computed into a buffer taken from a small pool and given
back once the writer has hashed and written it. The pool holds a few buffers per ``-j`` worker,
touched once and then reused, so the fuse's own memory is the same few megabytes for a 100 MB
model or a 100 GB one, and what it writes goes straight from a piece in the CPU's cache to the
page cache: read the inputs once, write the output once.

Same bytes as the tensor-by-tensor fuse (tests/test_fuse_stream.py): per entry the same float32
ops in the same order (the delta ``x - b`` in float32, the strategy's ``fold_first`` or
``copy`` + ``fold`` for the first pack, ``fold`` for the rest, then one conversion to the
tensor's dtype). Pieces are cut at the same ``DELTA_CHUNK`` boundaries as ``delta_chunks``; the
cut cannot change an elementwise result anyway.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from graftbuild.errors import BuildError, UserError

if TYPE_CHECKING:
    import torch

    from graftbuild.skillpack import PackReader
    from graftbuild.weights.tensors import ModelWeights, Streamed

TASK_CHUNKS = 4
"""``DELTA_CHUNK`` pieces per task on a ``-j`` worker (4 MiB of float32): few enough tasks that
the pool's overhead is noise, small enough that a worker's buffers stay a few megabytes."""


@dataclass
class _Tensor:
    """One tensor's operands, mapped (no copy) once for all its pieces."""

    name: str
    base: torch.Tensor  # flat
    sources: list[tuple[torch.Tensor, float]]  # flat source tensors and their weights
    out_dtype: torch.dtype


class _NotFinite(Exception):
    """A piece of ``name`` is NaN or infinite: the caller finds and reports the cause."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class _Buffers:
    """Reused piece buffers: a pool of output buffers per dtype (handed to the writer and
    given back), and per worker thread its float32 scratch (delta, accumulator, conversions)."""

    def __init__(self, entries: int, scratch: int) -> None:
        self.entries, self.scratch = entries, scratch
        self._free: dict[Any, list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def take(self, dtype: torch.dtype) -> torch.Tensor:
        import torch

        with self._lock:
            free = self._free.setdefault(dtype, [])
            if free:
                return free.pop()
        return torch.empty(self.entries, dtype=dtype)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free[buf.dtype].append(buf)

    def thread_scratch(self) -> dict[str, torch.Tensor]:
        import torch

        s = getattr(self._local, "s", None)
        if s is None:
            s = {k: torch.empty(self.scratch) for k in ("delta", "acc", "base", "source")}
            self._local.s = s
        return s


def streamed_fuse(
    names: list[str],
    base: ModelWeights,
    readers: list[PackReader],
    weights: list[float],
    strategy: Any,
    params: Any,
    jobs: int,
    whole_tensor: Callable[[str], torch.Tensor],
    advance: Callable[[int], None],
) -> Iterator[tuple[str, torch.Tensor | Streamed]]:
    """``(name, tensor or Streamed)`` for every tensor of the fused model, in order.

    ``readers`` are reference packs; ``strategy`` is elementwise (``fold``, optionally
    ``fold_first``). ``whole_tensor(name)`` is the tensor-by-tensor fuse of one tensor, used
    only to report a non-finite result with its cause (it raises the error that names it)."""
    import torch

    from graftbuild.skillpack.reader import DELTA_CHUNK
    from graftbuild.weights.memory import forget_pages
    from graftbuild.weights.parallel import ordered_map
    from graftbuild.weights.tensors import (
        Streamed,
        all_finite,
        check_finite,
        st_to_torch_dtype,
    )

    fold = strategy.fold
    fold_first = getattr(strategy, "fold_first", None)
    task = DELTA_CHUNK * TASK_CHUNKS
    buffers = _Buffers(task, DELTA_CHUNK)

    def operands(name: str) -> _Tensor:
        b = base.map(name)
        sources = []
        for r, w in zip(readers, weights, strict=True):
            if name in r.entries:
                x = r.reference_source(name)
                if x.shape != b.shape or x.dtype != b.dtype:
                    raise UserError(
                        f"{r.path}: tensor {name!r}: the source holds it as "
                        f"{x.dtype} {list(x.shape)}, the base as {b.dtype} {list(b.shape)}"
                    )
                sources.append((x.reshape(-1), w))
        return _Tensor(name, b.reshape(-1), sources, b.dtype)

    def cuts(n: int, floating: bool) -> list[tuple[int, int]]:
        """A tensor's tasks; a buffer (position_ids) or an empty tensor is one, the base's as is."""
        if not floating or n == 0:
            return [(0, n)]
        return [(lo, min(lo + task, n)) for lo in range(0, n, task)]

    def tasks() -> Iterator[tuple[_Tensor, int, int]]:
        for name in names:
            t = operands(name)  # mapped as the pool reaches it; unmapped with its last task
            for lo, hi in cuts(t.base.numel(), t.base.is_floating_point()):
                yield t, lo, hi

    def compute(item: tuple[_Tensor, int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One task's piece of the output, and the pool buffer it lives in (None: a view of
        the base, no buffer taken)."""
        t, lo, hi = item
        if not t.base.is_floating_point() or not t.sources:
            piece = t.base[lo:hi]  # no pack touches it: the base's bytes, written from its map
            if piece.is_floating_point() and not all_finite(piece):
                raise _NotFinite(t.name)
            return piece, None
        buf = buffers.take(t.out_dtype)
        out = buf[: hi - lo]
        s = buffers.thread_scratch()
        f32 = t.out_dtype == torch.float32
        for a in range(lo, hi, DELTA_CHUNK):
            e = min(a + DELTA_CHUNK, hi)
            n = e - a
            acc = out[a - lo : e - lo] if f32 else s["acc"][:n]
            b = t.base[a:e] if f32 else s["base"][:n].copy_(t.base[a:e])
            for k, (x, w) in enumerate(t.sources):
                xf = x[a:e] if f32 else s["source"][:n].copy_(x[a:e])
                d = torch.sub(xf, b, out=s["delta"][:n])
                if k > 0:
                    fold(acc, d, w, params, t.name)
                elif fold_first is not None and f32:  # added straight from the base
                    fold_first(b, d, w, params, t.name, acc)
                else:
                    fold(acc.copy_(b), d, w, params, t.name)
            piece = out[a - lo : e - lo]
            if not f32:
                piece.copy_(acc)  # the one conversion to the tensor's dtype
            if not all_finite(piece):  # checked while the piece is still in the CPU's cache
                buffers.give(buf)
                raise _NotFinite(t.name)
        # the task's inputs are done: let their pages go, once per task (each madvise is a TLB
        # shootdown on every CPU; per 1 MiB piece and source they were ~3.5% of the fuse)
        for x, _ in t.sources:
            forget_pages(x, lo, hi)
        forget_pages(t.base, lo, hi)
        return out, buf

    results = ordered_map(compute, tasks(), jobs)

    def pieces(count: int) -> Iterator[torch.Tensor]:
        for _ in range(count):
            try:
                piece, buf = next(results)
            except _NotFinite as e:
                check_finite(e.name, whole_tensor(e.name))  # raises, naming the cause
                raise BuildError(f"fuse: tensor {e.name!r} is not finite") from None
            yield piece
            if buf is not None:  # the writer is done with it
                buffers.give(buf)
            else:  # a piece of the base's map, written: let its pages go
                forget_pages(piece, 0, piece.numel())

    for name in names:
        info = base.infos[name]
        dtype = st_to_torch_dtype(info.dtype)
        count = len(cuts(math.prod(info.shape), dtype.is_floating_point))
        yield name, Streamed(tuple(info.shape), dtype, pieces(count))
        advance(1)
