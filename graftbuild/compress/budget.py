"""Size budgets: choose every tensor's ranks, bands and keep fraction so that a pack fits a
byte budget with the least total error.

Each tensor keeps the method its role gives it; only its size parameters are chosen. A tensor
offers *units* of storage, each with a cost in bytes and the squared Frobenius error it removes:

- ``mixed``: singular component i at b bits (b ∈ {2, 3, 4, 8}) costs its float32 σ, its two
  b-bit vectors and their float16 group scales / zeros, and leaves ``σ_i² ε_b`` of error, where
  ``ε_b`` is the measured round-to-nearest error of this tensor's leading singular vectors at b
  bits (a dropped component leaves ``σ_i²``);
- ``lowrank``: component i costs ``(m + n)`` values and removes ``σ_i²``;
- ``prune``: entry j costs a value and an index and removes ``Δ_j²``;
- ``exact``: fixed cost.

With calibration statistics the errors are measured where they matter, in the module's output
per token: component i's ``σ_i²`` becomes ``σ_i² v_iᵀ H v_i`` (``H`` the second moment of the
module's input) and entry (j, k) weighs ``Δ_jk² H_kk``; an embedding's rows are weighted by how
often their token occurs. Without it, plain squared Frobenius error.

The allocation minimises ``error + λ · bytes`` for every unit independently (the greedy "error
removed per byte" order, taken all at once), and bisects λ so that the total lands just under
the budget. A component's bits are raised to those of any later component (the codec's bands
are consecutive runs of the spectrum, with bits never rising along it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from graftbuild.compress.codecs._common import DTYPE_NBYTES, svd
from graftbuild.compress.quant import dequantize, n_groups, quantize_rtn

if TYPE_CHECKING:
    import torch

MIXED_BITS = (2, 3, 4, 8)
_SKETCH = 1 << 16  # prune: at most this many sorted magnitudes kept per tensor


@dataclass
class RateProfile:
    """What the allocator needs to know about one tensor (small: no copy of the tensor)."""

    name: str
    method: str
    spec: dict[str, Any]
    shape: tuple[int, ...]
    fixed_bytes: int = 0
    energy: Any = None  # mixed / lowrank: σ² (descending); prune: sorted Δ² sketch (descending)
    stride: int = 1  # prune: entries per sketch point
    numel: int = 0
    costs: list[int] = field(default_factory=list)  # mixed: bytes of one component at each bits
    eps: list[float] = field(default_factory=list)  # mixed: relative error at each bits

    def choose(self, lam: float) -> tuple[int, dict[str, Any]]:
        """(bytes, codec spec) minimising ``error + lam · bytes`` for this tensor."""
        import torch

        if self.method == "mixed":
            s2 = self.energy[:, None]
            eps = torch.tensor([1.0, *self.eps], dtype=torch.float64)[None, :]
            cost = torch.tensor([0, *self.costs], dtype=torch.float64)[None, :]
            choice = torch.argmin(s2 * eps + lam * cost, dim=1)
            # Bits never rise along the spectrum: a component gets at least any later one's.
            choice = torch.flip(torch.cummax(torch.flip(choice, (0,)), 0).values, (0,)).tolist()
            kept = next((i for i, c in enumerate(choice) if c == 0), len(choice))
            bits = [MIXED_BITS[c - 1] for c in choice[:kept]] or [MIXED_BITS[0]]
            bands: list[dict[str, int]] = []
            for b in bits:
                if bands and bands[-1]["bits"] == b:
                    bands[-1]["rank"] += 1
                else:
                    bands.append({"rank": 1, "bits": b})
            nbytes = sum(
                band["rank"] * self.costs[MIXED_BITS.index(band["bits"])] for band in bands
            )
            return nbytes, {**self.spec, "bands": bands}
        if self.method == "lowrank":
            unit = self.costs[0]
            m, n = self.shape
            cap = max(1, 4 * m * n // unit)  # beyond this the codec would store it exactly
            k = min(cap, max(1, int((self.energy > lam * unit).sum())))
            spec = {k_: v for k_, v in self.spec.items() if k_ not in ("energy", "max_rank")}
            return k * unit, {**spec, "rank": k, "energy": None, "max_rank": None}
        if self.method == "prune":
            unit = self.costs[0]
            k = max(1, min(self.numel, int((self.energy > lam * unit).sum()) * self.stride))
            return k * unit, {**self.spec, "keep": k / self.numel}
        return self.fixed_bytes, self.spec


def _mixed_costs(m: int, n: int, group_size: int) -> list[int]:
    groups = n_groups(m, group_size) + n_groups(n, group_size)
    return [4 + math.ceil((m + n) * b / 8) + 4 * groups for b in MIXED_BITS]


def rate_profile(
    name: str, delta: torch.Tensor, spec: dict[str, Any], weight: torch.Tensor | None = None
) -> RateProfile:
    """The allocator's view of one float32 delta under its role's codec spec.

    ``weight``: the module's input second moment ``H`` (n × n), or per-row weights (m, for an
    embedding: token frequencies), or None for plain Frobenius error.
    """
    method = spec["method"]
    shape = tuple(delta.shape)
    numel = delta.numel()
    import torch

    if weight is not None and not (
        delta.ndim == 2
        and (
            (weight.ndim == 2 and tuple(weight.shape) == (shape[1], shape[1]))
            or (weight.ndim == 1 and weight.shape[0] == shape[0])
        )
    ):
        weight = None  # statistics that do not fit this tensor: Frobenius error
    if method in ("mixed", "lowrank") and delta.ndim == 2 and min(shape) > 0:
        m, n = shape
        u, s, vh = (t.cpu() for t in svd(delta))
        energy = s.double() ** 2
        if weight is not None and weight.ndim == 2:
            energy = energy * ((vh.double() @ weight.double()) * vh.double()).sum(dim=1)
        elif weight is not None:
            energy = energy * (u.double() ** 2 * weight.double()[:, None]).sum(dim=0)
        if method == "lowrank":
            unit = (m + n) * DTYPE_NBYTES[spec.get("dtype") or "float16"]
            return RateProfile(name, method, spec, shape, energy=energy, costs=[unit])
        g = int(spec.get("group_size") or 128)
        top = min(64, s.numel())
        eps = []
        for b in MIXED_BITS:
            ue = dequantize(quantize_rtn(u[:, :top].T, b, g)) - u[:, :top].T
            ve = dequantize(quantize_rtn(vh[:top], b, g)) - vh[:top]
            eps.append(float((ue.pow(2).sum() + ve.pow(2).sum()) / top))
        return RateProfile(
            name, method, spec, shape, energy=energy, costs=_mixed_costs(m, n, g), eps=eps
        )
    if method == "prune" and numel > 0:
        sq = delta.double().pow(2)
        if weight is not None and weight.ndim == 2:
            sq = sq * torch.diagonal(weight).double()[None, :]
        elif weight is not None:
            sq = sq * weight.double()[:, None]
        sq = sq.reshape(-1).sort(descending=True).values.cpu()
        stride = max(1, math.ceil(numel / _SKETCH))
        unit = DTYPE_NBYTES[spec.get("dtype") or "float16"] + (4 if numel < 2**31 else 8)
        return RateProfile(
            name, method, spec, shape, energy=sq[::stride].clone(), stride=stride,
            numel=numel, costs=[unit],
        )  # fmt: skip
    # exact, or a tensor the codec stores exactly anyway
    return RateProfile(name, method, spec, shape, fixed_bytes=4 * numel)


def allocate(profiles: list[RateProfile], target: int) -> dict[str, dict[str, Any]]:
    """Codec spec of every tensor so that the summed payload is as close to ``target`` bytes
    as the units allow without exceeding it (or the smallest possible, if that is bigger)."""

    def total(lam: float) -> int:
        return sum(p.choose(lam)[0] for p in profiles)

    lo, hi = 1e-30, 1.0
    while total(hi) > target and hi < 1e30:
        hi *= 16
    for _ in range(100):  # bisect in log space: total(λ) falls as λ rises
        mid = math.sqrt(lo * hi)
        if total(mid) > target:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-9:
            break
    return {p.name: p.choose(hi)[1] for p in profiles}


def fp16_delta_nbytes(shapes: list[tuple[int, ...]]) -> int:
    """Bytes of the whole delta in float16: the unit budgets are expressed in."""
    return sum(2 * math.prod(s) for s in shapes)
