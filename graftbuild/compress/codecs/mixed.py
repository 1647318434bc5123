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

import math
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from graftbuild.compress.bitpack import packed_nbytes
from graftbuild.compress.codecs._common import (
    as_float32,
    exact_parts,
    expect_params,
    numel,
    svd,
    weighted_spectrum,
)
from graftbuild.compress.codecs.base import (
    CodecParams,
    DiscreteRate,
    Encoded,
    FixedRate,
    RateProfile,
)
from graftbuild.compress.codecs.exact import FALLBACK, decode_exact, encode_exact
from graftbuild.compress.quant import (
    QuantizedMatrix,
    dequantize,
    effective_group_size,
    n_groups,
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


MIXED_BITS = (2, 3, 4, 8)
"""The bit widths the budget's rate model measures."""


def _component_costs(m: int, n: int, group_size: int) -> list[int]:
    """Bytes of one component at each of MIXED_BITS: its float32 σ, two vectors, their scales."""
    groups = n_groups(m, group_size) + n_groups(n, group_size)
    return [4 + math.ceil((m + n) * b / 8) + 4 * groups for b in MIXED_BITS]


class MixedRate(DiscreteRate):
    """The role's bands give the *shape* (their relative ranks and bits: by default 1 %, 5 % and
    30 % of the spectrum at 8, 4 and 2 bits); candidate i is total rank K = i + 1 split in those
    proportions. Component i at b bits costs its σ, its two b-bit vectors and their group
    scales / zeros, and leaves ``share_i · ε_b`` of error, ``ε_b`` the measured round-to-nearest
    error of this tensor's leading singular vectors at b bits (a dropped component leaves its
    whole share). (Letting every component pick its own bits by this error model favours fewer
    3-4-bit components, which kept less of the skills in benchmarks/compression.py than the
    paper's mostly-2-bit shape.)"""

    def __init__(
        self,
        name: str,
        spec: dict[str, Any],
        shape: tuple[int, ...],
        cumshape: list[float],
        bits: list[int],
        cost: torch.Tensor,
        err: torch.Tensor,
    ) -> None:
        super().__init__(name, spec, shape)
        self.cumshape, self.bits, self.cost, self.err = cumshape, bits, cost, err

    def at(self, index: int) -> tuple[int, dict[str, Any]]:
        k = index + 1
        cuts = [0, *(min(k, round(k * c)) for c in self.cumshape[:-1]), k]
        bands = [
            {"rank": b - a, "bits": bits}
            for a, b, bits in zip(cuts[:-1], cuts[1:], self.bits, strict=True)
            if b > a
        ]
        return int(self.cost[index]), {**self.spec, "bands": bands}


class MixedCodec:
    name: ClassVar[str] = "mixed"
    version: ClassVar[int] = 1
    Params: ClassVar[type[CodecParams]] = MixedParams
    uses_calibration: ClassVar[bool] = True

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
        out = torch.zeros(m, n, dtype=torch.float32, device=sigma.device)
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

    def rate(
        self, name: str, delta: torch.Tensor, spec: dict[str, Any], weight: torch.Tensor | None
    ) -> RateProfile:
        import torch

        shape = tuple(delta.shape)
        if delta.ndim != 2 or min(shape) == 0:
            return FixedRate(name, spec, shape, 4 * delta.numel())  # stored exactly anyway
        m, n = shape
        u, s, vh, energy = weighted_spectrum(delta, weight)
        g = int(spec.get("group_size") or 128)
        top = min(64, s.numel())
        eps = {}
        for b in MIXED_BITS:
            ue = dequantize(quantize_rtn(u[:, :top].T, b, g)) - u[:, :top].T
            ve = dequantize(quantize_rtn(vh[:top], b, g)) - vh[:top]
            eps[b] = float((ue.pow(2).sum() + ve.pow(2).sum()) / top)
        full = s.numel()
        shape_bands = spec.get("bands") or [b.model_dump() for b in _default_bands()]
        shares = [b.get("rank") or b["fraction"] * full for b in shape_bands]
        bits = [int(b["bits"]) for b in shape_bands]
        cum = torch.tensor(shares, dtype=torch.float64).cumsum(0) / sum(shares)
        ks = torch.arange(1, full + 1, dtype=torch.float64)
        cuts = torch.round(ks[:, None] * cum[None, :]).clamp_(max=ks[:, None])
        cuts[:, -1] = ks
        cuts = torch.cat([torch.zeros(full, 1, dtype=torch.float64), cuts], 1).long()
        cum_e = torch.cat([torch.zeros(1, dtype=torch.float64), energy.cumsum(0)])
        unit = dict(zip(MIXED_BITS, _component_costs(m, n, g), strict=True))
        err = cum_e[-1] - cum_e[cuts[:, -1]]
        cost = torch.zeros(full, dtype=torch.float64)
        for j, b in enumerate(bits):
            err += eps[b] * (cum_e[cuts[:, j + 1]] - cum_e[cuts[:, j]])
            cost += unit[b] * (cuts[:, j + 1] - cuts[:, j])
        err[cost > 4 * m * n] = math.inf  # the codec would store those exactly
        return MixedRate(name, spec, shape, cum.tolist(), bits, cost, err)

    def describe(self, entry: dict[str, Any]) -> dict[str, Any]:
        meta = entry["meta"]
        bands = [{"rank": int(b["rank"]), "bits": int(b["bits"])} for b in meta["bands"]]
        return {
            "bands": bands,
            "rank": sum(b["rank"] for b in bands),
            "quantizer": meta.get("quantizer"),
        }

    def label(self, params: dict[str, Any]) -> str:
        bands = params.get("bands") or []
        inner = ", ".join(f"{b.get('fraction')}@{b.get('bits')}b" for b in bands)
        return f"mixed({inner})"

    def lora_factors(
        self, reader: Any, name: str, entry: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor] | str:
        """The decoded (dequantised) delta re-factored by SVD at its stored rank: exact up to
        float rounding, since the decoded delta has that rank."""
        import torch

        rank = sum(int(band["rank"]) for band in entry["meta"]["bands"])
        delta = reader.decode(name).to(torch.float64)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        lora_b = (u[:, :rank] * s[:rank]).to(torch.float32).contiguous()
        return vh[:rank].to(torch.float32).contiguous(), lora_b

    def stored_parts(
        self, meta: dict[str, Any], shape: tuple[int, ...]
    ) -> dict[str, tuple[str, list[int]]]:
        if meta.get("fallback") == FALLBACK:
            return exact_parts(shape)
        m, n = shape
        g = int(meta["group_size"])
        parts: dict[str, tuple[str, list[int]]] = {}
        for i, band in enumerate(meta["bands"]):
            r, bits = int(band["rank"]), int(band["bits"])
            for side, length in (("u", m), ("v", n)):
                parts[f"b{i}.{side}.codes"] = ("U8", [packed_nbytes(r * length, bits)])
                parts[f"b{i}.{side}.scale"] = ("F16", [r, n_groups(length, g)])
                parts[f"b{i}.{side}.zero"] = ("F16", [r, n_groups(length, g)])
        parts["sigma"] = ("F32", [sum(int(b["rank"]) for b in meta["bands"])])
        return parts

    def layout(self, params: CodecParams, shape: tuple[int, ...]) -> None:
        return None  # the bands' ranks are known, but sigma and codes follow the delta
