"""``sparse``: a seeded random subset of the delta, rescaled (DARE-style), stored without indices.

Entry j of the flattened delta is kept when ``hash(seed, j) < keep · 2³²``, where ``hash`` is
the "lowbias32" 32-bit mixer of j's low 32 bits plus a key mixed from the seed and j's high
bits, computed with numpy uint32 arithmetic (wrapping multiplication, single-threaded). The
mask is therefore a pure function of (seed, j): decode regenerates it from the seed, chunk by
chunk, with no index stored, and the bytes are identical across runs, machines and thread
counts (integer ops only, no random number generator state). About ``keep · n`` entries are
kept (the exact count is in ``meta["kept"]``).

With ``rescale`` (the default, as in DARE) the kept entries are multiplied by ``n / kept`` at
decode time, so the decoded delta equals the original in expectation: the first-order effect of
the fine-tune on the loss is kept, and what is lost is noise spread over the dropped entries.

Parts: ``values`` (1-D, ``dtype``, the kept entries in flat order, not rescaled). ``meta``:
``kept``, ``seed``, ``threshold``, ``scale`` (the decode multiplier), ``dtype``.

Against magnitude pruning at equal bytes, each kept entry costs its value only (2 bytes in
float16) instead of value + int32 index (6 bytes): three times as many entries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from graftbuild.compress.codecs._common import (
    DTYPE_NBYTES,
    ST_TAG,
    ValueDType,
    as_float32,
    expect_params,
    not_low_rank,
    numel,
    relative,
    torch_dtype,
)
from graftbuild.compress.codecs.base import (
    CodecParams,
    Encoded,
    FixedRate,
    RateProfile,
    label_params,
)

if TYPE_CHECKING:
    import torch

_M32 = 0xFFFFFFFF
_CHUNK = 1 << 22  # entries hashed at a time: bounds the int64 temporaries to ~32 MB each
_MIN_KEEP = 1e-4


class SparseParams(CodecParams):
    keep: float = Field(default=0.1, gt=0, le=1, description="expected fraction of entries kept")
    seed: int = Field(default=0, ge=0, lt=2**31)
    rescale: bool = True
    dtype: ValueDType = "float16"


def _mix32(x: Any) -> Any:
    """lowbias32 (Wellons), a bijective 32-bit mixer with good avalanche, on a numpy uint32
    array (uint32 products wrap modulo 2³², as the mixer needs; in place)."""
    import numpy as np

    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def threshold_of(keep: float) -> int:
    """Entries whose hash is below this are kept (at least 1 in 2³², at most all)."""
    return max(1, min(1 << 32, round(keep * (1 << 32))))


def _key(seed: int, high: int) -> int:
    """The per-(seed, 2³²-block) offset added to an entry's low 32 bits before mixing."""
    import numpy as np

    k = _mix32(np.array([(high ^ 0x9E3779B9) & _M32], dtype=np.uint32))
    k ^= np.uint32(seed & _M32)
    return int(_mix32(k)[0])


def mask_chunk(seed: int, start: int, stop: int, threshold: int, device: Any = None) -> Any:
    """Boolean mask of flat entries ``start .. stop - 1`` (within one block of 2³² entries):
    kept or not, a function of seed and position only (numpy integer ops, single-threaded, so
    the same on every machine)."""
    import numpy as np
    import torch

    if start >> 32 != (stop - 1) >> 32:
        raise ValueError("sparse: a mask chunk may not cross a 2**32 boundary")
    low = start & _M32
    h = np.arange(low, low + (stop - start), dtype=np.uint32)
    h += np.uint32(_key(seed, start >> 32))
    h = _mix32(h)
    mask = h < threshold if threshold < (1 << 32) else np.ones(h.shape, dtype=bool)
    return torch.from_numpy(mask).to(device)


def seeded_mask(seed: int, n: int, threshold: int, device: Any = None) -> Any:
    """The whole mask of ``n`` entries (concatenated chunks)."""
    import torch

    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=device)
    return torch.cat(
        [mask_chunk(seed, s, min(n, s + _CHUNK), threshold, device) for s in range(0, n, _CHUNK)]
    )


class SparseRate(RateProfile):
    """Keep fraction p costs ``p · n`` values and leaves the expected error ``c (1 − p) / p``
    (rescaled) or ``c (1 − p)`` (not), ``c`` being the delta's diagonally weighted energy as a
    share of its (weighted) energy: a random mask's error is independent across entries, so
    only the diagonal of the input second moment weighs it, while the delta itself is weighed
    by all of it. Coherent deltas (large off-diagonal ``H``) therefore drop cheaply."""

    def __init__(
        self, name: str, spec: dict[str, Any], shape: tuple[int, ...], coherence: float
    ) -> None:
        super().__init__(name, spec, shape)
        self.n = numel(shape)
        self.c = coherence
        self.unit = DTYPE_NBYTES[spec.get("dtype") or "float16"]
        self.rescale = spec.get("rescale", True)

    def _err(self, p: float) -> float:
        return self.c * (1 - p) / p if self.rescale else self.c * (1 - p)

    def point(self, lam: float) -> tuple[int, float, dict[str, Any]]:
        import math

        cost = self.unit * self.n
        if self.rescale:
            # d/dp [c (1 − p)/p + λ cost p] = 0  →  p = sqrt(c / (λ cost))
            p = math.sqrt(self.c / max(lam * cost, 1e-300)) if self.c > 0 else _MIN_KEEP
        else:
            p = 1.0 if self.c > lam * cost else _MIN_KEEP
        p = min(1.0, max(_MIN_KEEP, 1.0 / self.n, p))
        return round(p * cost), self._err(p), {**self.spec, "keep": p}


class SparseCodec:
    name: ClassVar[str] = "sparse"
    version: ClassVar[int] = 1
    Params: ClassVar[type[CodecParams]] = SparseParams
    uses_calibration: ClassVar[bool] = False

    def encode(self, delta: torch.Tensor, params: CodecParams) -> Encoded:
        import torch

        params = expect_params(params, SparseParams)
        flat = as_float32(delta).reshape(-1)
        if not torch.isfinite(flat).all():
            raise ValueError("sparse: the delta has non-finite entries")
        n = flat.numel()
        threshold = threshold_of(params.keep)
        mask = seeded_mask(params.seed, n, threshold, flat.device)
        values = flat[mask].to(torch_dtype(params.dtype)).cpu().contiguous()
        kept = int(values.numel())
        scale = n / kept if params.rescale and kept else 1.0
        meta = {
            "kept": kept,
            "seed": params.seed,
            "threshold": threshold,
            "scale": scale,
            "dtype": params.dtype,
        }
        return Encoded({"values": values}, meta)

    def decode(
        self, parts: dict[str, torch.Tensor], meta: dict[str, Any], shape: tuple[int, ...]
    ) -> torch.Tensor:
        import torch

        n = numel(shape)
        values = parts["values"].to(torch.float32) * float(meta["scale"])
        out = torch.zeros(n, dtype=torch.float32, device=values.device)
        seed, threshold, at = int(meta["seed"]), int(meta["threshold"]), 0
        for s in range(0, n, _CHUNK):
            mask = mask_chunk(seed, s, min(n, s + _CHUNK), threshold, values.device)
            k = int(mask.sum())
            out[s : s + mask.numel()][mask] = values[at : at + k]
            at += k
        if at != values.numel():
            raise ValueError(
                f"sparse: the mask keeps {at} entries, the pack stores {values.numel()}"
            )
        return out.reshape(shape)

    def expected_nbytes(self, meta: dict[str, Any], shape: tuple[int, ...]) -> int:
        return int(meta["kept"]) * DTYPE_NBYTES[meta["dtype"]]

    def rate(
        self, name: str, delta: torch.Tensor, spec: dict[str, Any], weight: torch.Tensor | None
    ) -> RateProfile:
        """``c`` = Σ Δ_jk² H_kk / tr(Δ H Δᵀ) with statistics (rows weighted alike for per-row
        weights), 1 without."""
        import torch

        shape = tuple(delta.shape)
        if delta.numel() == 0:
            return FixedRate(name, spec, shape, 0)
        d = delta.double()
        if weight is not None and weight.ndim == 2 and d.ndim == 2:
            w = weight.double()
            diag = float((d.pow(2) * torch.diagonal(w)[None, :]).sum())
            full = float(((d @ w) * d).sum())
            c = float(relative(torch.tensor(diag), full)) if full > 0 else 1.0
        else:
            c = 1.0
        return SparseRate(name, spec, shape, c)

    def describe(self, entry: dict[str, Any]) -> dict[str, Any]:
        count = numel(tuple(entry["shape"]))
        return {"keep": int(entry["meta"]["kept"]) / count if count else 0.0}

    def label(self, params: dict[str, Any]) -> str:
        return label_params(self.name, params)

    def lora_factors(self, reader: Any, name: str, entry: dict[str, Any]) -> str:
        return not_low_rank(self.name)

    def stored_parts(
        self, meta: dict[str, Any], shape: tuple[int, ...]
    ) -> dict[str, tuple[str, list[int]]]:
        return {"values": (ST_TAG[meta["dtype"]], [int(meta["kept"])])}

    def layout(self, params: CodecParams, shape: tuple[int, ...]) -> None:
        return None  # how many entries the mask keeps is known, but not cheaply before encoding
