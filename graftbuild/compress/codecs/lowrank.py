"""``lowrank``: truncated SVD ``Δ ≈ U_k Σ_k V_kᵀ`` (GraftLLM's operator for attention).

The rank is fixed (``rank``) or the smallest k whose energy ``Σ_{i≤k} σ_i²`` reaches
``energy · Σ_i σ_i²``, capped by ``max_rank`` and by ``min(m, n)``.

Parts: ``a`` = ``U_k diag(σ_k)`` (m × k) and ``b`` = ``V_kᵀ`` (k × n), both in ``dtype``.
Decode: ``a @ b`` in float32.

Falls back to ``exact`` storage (``meta["fallback"] = "exact"``, part ``data``) for tensors that
are not 2-D, and for matrices where the factors would take more bytes than the dense float32
delta (``k (m + n) · bytes(dtype) > 4 m n``): a low-rank code is never bigger than exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, model_validator

from graftbuild.compress.codecs._common import (
    DTYPE_NBYTES,
    ValueDType,
    as_float32,
    expect_params,
    numel,
    svd,
    torch_dtype,
)
from graftbuild.compress.codecs.base import CodecParams, Encoded
from graftbuild.compress.codecs.exact import FALLBACK, decode_exact, encode_exact

if TYPE_CHECKING:
    import torch


class LowRankParams(CodecParams):
    """Exactly one of ``energy`` and ``rank``; ``energy = 0.9`` when neither is given."""

    energy: float | None = Field(default=None, gt=0, le=1)
    rank: int | None = Field(default=None, ge=1)
    max_rank: int | None = Field(default=None, ge=1)
    dtype: ValueDType = "float16"

    @model_validator(mode="before")
    @classmethod
    def _default_energy(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("energy") is None and data.get("rank") is None:
            return {**data, "energy": 0.9}
        return data

    @model_validator(mode="after")
    def _one_budget(self) -> LowRankParams:
        if self.energy is not None and self.rank is not None:
            raise ValueError("lowrank: give exactly one of 'energy' and 'rank', not both")
        return self


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest k with ``Σ_{i≤k} σ_i² ≥ energy · Σ σ²`` (1 for an all-zero spectrum)."""
    import torch

    e = s.to(torch.float64) ** 2
    cum = torch.cumsum(e, dim=0)
    total = float(cum[-1])
    if total <= 0.0:
        return 1
    k = int(torch.searchsorted(cum, torch.tensor([energy * total], dtype=torch.float64))[0]) + 1
    return min(k, s.numel())


def energy_fraction(s: torch.Tensor, k: int) -> float:
    """Share of the squared spectrum in the first ``k`` components, rounded for metadata."""
    import torch

    e = s.to(torch.float64) ** 2
    total = float(e.sum())
    return 1.0 if total <= 0.0 else round(float(e[:k].sum()) / total, 6)


class LowRankCodec:
    name: ClassVar[str] = "lowrank"
    version: ClassVar[int] = 1
    Params: ClassVar[type[CodecParams]] = LowRankParams

    def encode(self, delta: torch.Tensor, params: CodecParams) -> Encoded:
        params = expect_params(params, LowRankParams)
        x = as_float32(delta)
        if x.ndim != 2 or min(x.shape) == 0:
            return encode_exact(x, {"fallback": FALLBACK})
        m, n = x.shape
        u, s, vh = svd(x)
        s_cpu = s.cpu()
        k = params.rank if params.rank is not None else energy_rank(s_cpu, params.energy or 0.9)
        k = min(k, s.numel(), params.max_rank or k)
        if k * (m + n) * DTYPE_NBYTES[params.dtype] > 4 * m * n:
            return encode_exact(x, {"fallback": FALLBACK})
        dtype = torch_dtype(params.dtype)
        a = (u[:, :k] * s[:k]).to(dtype).cpu().contiguous()
        b = vh[:k].to(dtype).cpu().contiguous()
        meta = {"rank": k, "dtype": params.dtype, "energy_kept": energy_fraction(s_cpu, k)}
        return Encoded({"a": a, "b": b}, meta)

    def decode(
        self, parts: dict[str, torch.Tensor], meta: dict[str, Any], shape: tuple[int, ...]
    ) -> torch.Tensor:
        import torch

        if meta.get("fallback") == FALLBACK:
            return decode_exact(parts, shape)
        return (parts["a"].to(torch.float32) @ parts["b"].to(torch.float32)).reshape(shape)

    def expected_nbytes(self, meta: dict[str, Any], shape: tuple[int, ...]) -> int:
        if meta.get("fallback") == FALLBACK:
            return 4 * numel(shape)
        m, n = shape
        return int(meta["rank"]) * (m + n) * DTYPE_NBYTES[meta["dtype"]]
