"""Tensor-level parallelism inside one node: ``-j N`` worker threads, results in input order.

torch, safetensors and the codecs release the GIL in their kernels, so threads give real
parallelism. Results are consumed in the order of the inputs and each tensor is computed by the
same code whatever ``jobs`` is, so the output bytes do not depend on ``-j``. At most ``jobs + 1``
tensors are in flight, which bounds memory to a few tensors per worker.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], jobs: int = 1) -> Iterator[R]:
    """``map(fn, items)`` on ``jobs`` threads, yielding results in input order."""
    if jobs <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="graftbuild")
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > jobs:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
