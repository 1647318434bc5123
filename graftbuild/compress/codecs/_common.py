"""Helpers shared by the codecs: value dtypes and a deterministic SVD."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, TypeVar

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
    largest-magnitude entry of u_i (the first one on ties) is positive.
    """
    import torch

    u, s, vh = torch.linalg.svd(matrix.to(torch.float32), full_matrices=False)
    if s.numel():
        idx = u.abs().argmax(dim=0)
        pivot = u.gather(0, idx[None, :])[0]
        sign = torch.where(pivot < 0, -1.0, 1.0).to(u.dtype)
        u = u * sign[None, :]
        vh = vh * sign[:, None]
    return u, s, vh


def expect_params(params: CodecParams, cls: type[P]) -> P:
    """``params`` narrowed to the codec's own parameter class (a TypeError otherwise)."""
    if not isinstance(params, cls):
        raise TypeError(f"expected {cls.__name__}, got {type(params).__name__}")
    return params
