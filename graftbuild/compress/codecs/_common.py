"""Helpers shared by the codecs: value dtypes and a deterministic SVD."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from graftbuild.compress.codecs.base import CodecParams

if TYPE_CHECKING:
    import torch

P = TypeVar("P", bound=CodecParams)

ValueDType = Literal["float16", "bfloat16", "float32"]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a stored dtype name ("float16", "int32", ...)."""
    import torch

    return getattr(torch, name)


DTYPE_NBYTES: dict[str, int] = {
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "int32": 4,
    "int64": 8,
}


ST_TAG: dict[str, str] = {
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "int32": "I32",
    "int64": "I64",
}
"""The safetensors dtype of each stored dtype name (``stored_parts``)."""


def exact_parts(shape: tuple[int, ...]) -> dict[str, tuple[str, list[int]]]:
    """The parts of an ``exact`` encoding (and of every codec's exact fallback)."""
    return {"data": ("F32", [int(d) for d in shape])}


def as_float32(delta: torch.Tensor) -> torch.Tensor:
    """``delta`` as float32 on its own device (may share storage; callers copy what they keep).

    Codecs compute where the delta lives (an SVD on a GPU is much faster) and return CPU parts.
    """
    import torch

    return delta.detach().to(torch.float32)


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``matrix = U diag(S) Vh`` in float32 with deterministic signs.

    Singular vectors are only defined up to sign; each pair (u_i, v_i) is flipped so that the
    largest-magnitude entry of u_i (the first one on ties) is positive. Inside ``svd_memo`` a
    CPU matrix's factors are remembered by content (callers must not modify them).
    """
    import torch

    x = matrix.to(torch.float32)
    key = _MEMO.key(x)
    if key is not None:
        hit = _MEMO.get(key)
        if hit is not None:
            return hit
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    out = _canonical_signs(u, s, vh)
    if key is not None:
        _MEMO.put(key, out)
    return out


SVD_MEMO_BYTES = 1 << 30
"""What ``svd_memo`` holds at most (factors are admitted until it is full, never evicted: a
pack step scans its tensors in the same order each time, where evicting the oldest would
drop every factor just before it is asked for again)."""


class _SvdMemo:
    """Factors of the SVDs computed inside ``svd_memo``, by the matrix's content hash."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.items: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.nbytes = 0
        self.hits = 0

    def key(self, x: torch.Tensor) -> tuple[Any, ...] | None:
        if not self.users or x.device.type != "cpu":
            return None
        import xxhash

        data = x.detach().contiguous().reshape(-1).view(torch_dtype("uint8")).numpy()
        return (tuple(x.shape), xxhash.xxh3_128_hexdigest(memoryview(data)))

    def get(self, key: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        with self.lock:
            hit = self.items.get(key)
            self.hits += hit is not None
            return hit

    def put(self, key: tuple[Any, ...], out: tuple[torch.Tensor, ...]) -> None:
        nbytes = sum(t.numel() * t.element_size() for t in out)
        with self.lock:
            if self.users and key not in self.items and self.nbytes + nbytes <= SVD_MEMO_BYTES:
                self.items[key] = out  # type: ignore[assignment]
                self.nbytes += nbytes


_MEMO = _SvdMemo()


@contextmanager
def svd_memo() -> Iterator[None]:
    """Within it, ``svd`` of a CPU matrix already decomposed returns the same factors without
    recomputing them (a budget pack decomposes each matrix for its rate, for the two candidate
    allocations and for the pack itself: 4 times). Same bytes as without it; the factors are
    dropped when the last user leaves."""
    with _MEMO.lock:
        _MEMO.users += 1
    try:
        yield
    finally:
        with _MEMO.lock:
            _MEMO.users -= 1
            if not _MEMO.users:
                _MEMO.items, _MEMO.nbytes = {}, 0


def _canonical_signs(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    import torch

    if s.numel():
        idx = u.abs().argmax(dim=0)
        pivot = u.gather(0, idx[None, :])[0]
        sign = torch.where(pivot < 0, -1.0, 1.0).to(u.dtype)
        u = u * sign[None, :]
        vh = vh * sign[:, None]
    return u, s, vh


# Randomized SVD (Halko, Martinsson & Tropp 2011, algorithm 4.4): a Gaussian sketch of
# k + OVERSAMPLE columns, POWER_ITERATIONS re-orthonormalised power steps, then an exact SVD of
# the small projected matrix. Measured against the exact truncated SVD
# (tests/test_randomized_svd.py, docs/BENCHMARKS.md): Frobenius error within
# RANDOMIZED_TOLERANCE of the optimum for k up to min(m, n) / RANDOMIZED_MIN_RATIO, on flat
# (pure noise) and decaying spectra alike, and 10-70x faster than torch.linalg.svd on
# 1024x2816 .. 2048x5632 matrices here.
OVERSAMPLE = 10
POWER_ITERATIONS = 4
RANDOMIZED_MIN_RATIO = 16  # at 1/8 it measured no faster than the exact SVD (BENCHMARKS.md)
RANDOMIZED_TOLERANCE = 1.02


def use_randomized(shape: tuple[int, ...], k: int) -> bool:
    """Whether a rank-``k`` factorisation of a matrix this shape takes the randomized path."""
    return len(shape) == 2 and k * RANDOMIZED_MIN_RATIO <= min(shape)


def randomized_svd(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` ``U, S, Vh`` of ``matrix``, deterministic (fixed seed, canonical signs)."""
    import torch

    x = matrix.to(torch.float32)
    m, n = x.shape
    width = min(k + OVERSAMPLE, m, n)
    # The sketch is drawn on the CPU whatever the device: CUDA's generator gives other numbers
    # for the same seed, and GPU packs then approximate another subspace than CPU packs (an
    # H200 build's decoded deltas differed from the CPU's by up to 14% of their largest value,
    # at the same error against the true delta).
    gen = torch.Generator().manual_seed(0)
    sketch = torch.randn(n, width, generator=gen, dtype=torch.float32).to(x.device)
    q = torch.linalg.qr(x @ sketch).Q
    for _ in range(POWER_ITERATIONS):
        q = torch.linalg.qr(x.T @ q).Q
        q = torch.linalg.qr(x @ q).Q
    ub, s, vh = torch.linalg.svd(q.T @ x, full_matrices=False)
    return _canonical_signs((q @ ub)[:, :k], s[:k], vh[:k])


def expect_params(params: CodecParams, cls: type[P]) -> P:
    """``params`` narrowed to the codec's own parameter class (a TypeError otherwise)."""
    if not isinstance(params, cls):
        raise TypeError(f"expected {cls.__name__}, got {type(params).__name__}")
    return params


def relative(energy: torch.Tensor, total: float) -> torch.Tensor:
    """Errors as shares of the tensor's own (weighted) energy: every tensor counts alike."""
    return energy / total if total > 0 else energy


def weighted_spectrum(
    delta: torch.Tensor, weight: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, S, Vh`` (on the CPU) of a 2-D delta and each component's share of the delta's
    energy: ``σ_i²``, or with calibration statistics ``σ_i² v_iᵀ H v_i`` (``weight`` = H, the
    module's input second moment) or ``σ_i² Σ_j w_j u_ij²`` (per-row weights), as a share of
    the total (float64). Used by the budget rate models of ``lowrank`` and ``mixed``."""
    u, s, vh = (t.cpu() for t in svd(delta))
    energy = s.double() ** 2
    if weight is not None and weight.ndim == 2:
        energy = energy * ((vh.double() @ weight.double()) * vh.double()).sum(dim=1)
    elif weight is not None:
        energy = energy * (u.double() ** 2 * weight.double()[:, None]).sum(dim=0)
    return u, s, vh, relative(energy, float(energy.sum()))


def not_low_rank(codec: str) -> str:
    """Why an entry stored by ``codec`` has no LoRA factors."""
    return f"stored with {codec} (not low-rank): LoRA cannot express it at low rank"



def descending_counts(energy: torch.Tensor) -> tuple[Any, Any]:
    """For a descending 1-D tensor: ``above(x)``, how many entries exceed x, and ``left(k)``,
    the sum of all entries after the first k (numpy binary search on a copy: the budget
    allocator asks these thousands of times per tensor, torch's per-call overhead dominated)."""
    import numpy as np

    values = energy.detach().double().cpu().numpy()
    tail = np.concatenate([np.cumsum(values[::-1])[::-1], [0.0]])
    neg = -values

    def above(x: float) -> int:
        return int(np.searchsorted(neg, -x, side="left"))

    def left(k: int) -> float:
        return max(0.0, float(tail[min(k, len(values))]))

    return above, left
