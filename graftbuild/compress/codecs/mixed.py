"""``mixed``: SVD with mixed-precision singular vectors (GraftLLM's operator for MLPs).

``Δ = U diag(σ) Vᵀ`` (descending σ) is cut into consecutive *bands* of components: the leading
band (largest σ) at high precision, later bands at fewer bits, everything after the last band
dropped. Band i takes the next ``rank`` components, or ``max(1, round(fraction · min(m, n)))``,
truncated at ``min(m, n)``; bands that would be empty are omitted from the encoding.

Parts, with R the total kept rank and for each stored band i of rank r and ``bits`` b:

- ``sigma``: float32 [R], the kept singular values in order;
- ``b{i}.u.codes`` / ``b{i}.u.scale`` / ``b{i}.u.zero``: ``U_iᵀ`` (r × m, one left singular
  vector per row) quantised with :func:`~graftbuild.compress.quant.quantize_rtn`;
- ``b{i}.v.codes`` / ``b{i}.v.scale`` / ``b{i}.v.zero``: ``V_iᵀ`` (r × n), likewise.

Decode: ``Σ_i Û_i diag(σ_i) V̂_iᵀ``. ``meta`` records ``bands`` ([{rank, bits}], stored bands
only), ``group_size`` and the quantiser used. Non-2-D tensors, and matrices whose code would be
bigger than the dense float32 delta, are stored exactly (``meta["fallback"] = "exact"``).

As in the paper, bands are quantised with GPTQ (:mod:`graftbuild.compress.gptq`) when the pack
step has calibration statistics for the module's input, and with round-to-nearest otherwise.
Both write the same layout (``meta["quantizer"]`` says which was used), so decoding is the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from graftbuild.compress.codecs._common import as_float32, expect_params, numel, svd
from graftbuild.compress.codecs.base import CodecParams, Encoded
from graftbuild.compress.codecs.exact import FALLBACK, decode_exact, encode_exact
from graftbuild.compress.quant import (
    QuantizedMatrix,
    dequantize,
    effective_group_size,
    quantize_rtn,
    quantized_nbytes,
)

if TYPE_CHECKING:
    import torch

    from graftbuild.compress.gptq import Calibration


class Band(CodecParams):
    """One precision band: exactly one of ``fraction`` (of min(m, n)) and ``rank``."""

    fraction: float | None = Field(default=None, gt=0, le=1)
    rank: int | None = Field(default=None, ge=1)
    bits: Literal[2, 3, 4, 8]

    @model_validator(mode="after")
    def _one_size(self) -> Band:
        if (self.fraction is None) == (self.rank is None):
            raise ValueError("a band needs exactly one of 'fraction' and 'rank'")
        return self


def _default_bands() -> list[Band]:
    return [Band(fraction=0.01, bits=8), Band(fraction=0.05, bits=4), Band(fraction=0.30, bits=2)]


class MixedParams(CodecParams):
    bands: list[Band] = Field(default_factory=_default_bands, min_length=1)
    group_size: int = Field(default=128, ge=1)


def rtn_band(
    u: torch.Tensor, vt: torch.Tensor, bits: int, group_size: int
) -> tuple[QuantizedMatrix, QuantizedMatrix]:
    """Data-free round-to-nearest of each singular vector: (Ûᵀ, V̂ᵀ), one vector per row."""
    return quantize_rtn(u.T, bits, group_size), quantize_rtn(vt, bits, group_size)


def band_ranks(bands: list[Band], full: int) -> list[tuple[int, int]]:
    """(rank, bits) of each non-empty band for a matrix with ``full = min(m, n)`` components."""
    out: list[tuple[int, int]] = []
    start = 0
    for band in bands:
        r = band.rank if band.rank is not None else max(1, round((band.fraction or 0) * full))
        r = min(r, full - start)
        if r <= 0:
            break
        out.append((r, band.bits))
        start += r
    return out


def _coded_nbytes(ranks: list[tuple[int, int]], m: int, n: int, group_size: int) -> int:
    total = 4 * sum(r for r, _ in ranks)
    for r, bits in ranks:
        total += quantized_nbytes(r, m, bits, group_size) + quantized_nbytes(r, n, bits, group_size)
    return total


class MixedCodec:
    name: ClassVar[str] = "mixed"
    version: ClassVar[int] = 1
    Params: ClassVar[type[CodecParams]] = MixedParams

    def encode(
        self, delta: torch.Tensor, params: CodecParams, calibration: Calibration | None = None
    ) -> Encoded:
        """``calibration``: statistics of the module's inputs; GPTQ when given, else RTN."""
        from graftbuild.compress.gptq import gptq_factors

        params = expect_params(params, MixedParams)
        x = as_float32(delta)
        if x.ndim != 2 or min(x.shape) == 0:
            return encode_exact(x, {"fallback": FALLBACK})
        m, n = x.shape
        ranks = band_ranks(params.bands, min(m, n))
        if _coded_nbytes(ranks, m, n, params.group_size) > 4 * m * n:
            return encode_exact(x, {"fallback": FALLBACK})
        u, s, vh = (t.cpu() for t in svd(x))  # quantisation and bit-packing run on the CPU
        kept = sum(r for r, _ in ranks)
        if calibration is None:
            quantized = []
            start = 0
            for r, bits in ranks:
                quantized.append(
                    rtn_band(
                        u[:, start : start + r], vh[start : start + r], bits, params.group_size
                    )
                )
                start += r
        else:
            quantized = gptq_factors(
                u[:, :kept], s[:kept], vh[:kept], ranks, params.group_size, calibration
            )
        parts: dict[str, torch.Tensor] = {}
        for i, (uq, vq) in enumerate(quantized):
            for side, q in (("u", uq), ("v", vq)):
                parts[f"b{i}.{side}.codes"] = q.codes.contiguous()
                parts[f"b{i}.{side}.scale"] = q.scale.contiguous()
                parts[f"b{i}.{side}.zero"] = q.zero.contiguous()
        parts["sigma"] = s[:kept].clone().contiguous()
        meta = {
            "bands": [{"rank": r, "bits": bits} for r, bits in ranks],
            "group_size": params.group_size,
            "quantizer": "rtn" if calibration is None else "gptq",
        }
        return Encoded(parts, meta)

    def decode(
        self, parts: dict[str, torch.Tensor], meta: dict[str, Any], shape: tuple[int, ...]
    ) -> torch.Tensor:
        import torch

        if meta.get("fallback") == FALLBACK:
            return decode_exact(parts, shape)
        m, n = shape
        g = int(meta["group_size"])
        sigma = parts["sigma"].to(torch.float32)
        out = torch.zeros(m, n, dtype=torch.float32)
        start = 0
        for i, band in enumerate(meta["bands"]):
            r, bits = int(band["rank"]), int(band["bits"])
            ut, vt = (
                dequantize(
                    QuantizedMatrix(
                        parts[f"b{i}.{side}.codes"],
                        parts[f"b{i}.{side}.scale"],
                        parts[f"b{i}.{side}.zero"],
                        bits,
                        effective_group_size(length, g),
                        (r, length),
                    )
                )
                for side, length in (("u", m), ("v", n))
            )
            out += (ut.T * sigma[start : start + r]) @ vt
            start += r
        return out

    def expected_nbytes(self, meta: dict[str, Any], shape: tuple[int, ...]) -> int:
        if meta.get("fallback") == FALLBACK:
            return 4 * numel(shape)
        m, n = shape
        ranks = [(int(b["rank"]), int(b["bits"])) for b in meta["bands"]]
        return _coded_nbytes(ranks, m, n, int(meta["group_size"]))
