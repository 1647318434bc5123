"""Tensor-level parallelism inside one node: ``-j N`` worker threads, results in input order.

torch, safetensors and the codecs release the GIL in their kernels, so threads give real
parallelism. Results are consumed in the order of the inputs and each tensor is computed by the
same code whatever ``jobs`` is, so the output bytes do not depend on ``-j``. At most ``jobs + 1``
tensors are in flight, and with a ``cost`` (a tensor's bytes) and a ``budget`` new work waits
while the work in flight already adds up to the budget: with the budget at the largest tensor's
size, the big tensors (embeddings) go one at a time and peak memory stays that of ``-j1``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    jobs: int = 1,
    cost: Callable[[T], int] | None = None,
    budget: int | None = None,
) -> Iterator[R]:
    """``map(fn, items)`` on ``jobs`` threads, yielding results in input order."""
    if jobs <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="graftbuild")
    pending: deque[tuple[Future[R], int]] = deque()
    in_flight = 0
    try:
        for item in items:
            c = cost(item) if cost is not None else 0
            # Wait for the oldest while the window is full or the budget would be exceeded.
            while pending and (
                len(pending) > jobs or (budget is not None and in_flight + c > budget)
            ):
                future, done_cost = pending.popleft()
                in_flight -= done_cost
                result = future.result()
                del future  # only the consumer holds a finished tensor
                yield result
                del result
            pending.append((pool.submit(fn, item), c))
            in_flight += c
        while pending:
            result = pending.popleft()[0].result()
            yield result
            del result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
