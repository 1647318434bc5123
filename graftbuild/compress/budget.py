"""Size budgets: choose every tensor's ranks, bands and keep fraction so that a pack fits a
byte budget with the least total error.

Each tensor keeps the method its role gives it; only its size parameters are chosen. A tensor
offers *units* of storage, each with a cost in bytes and the squared Frobenius error it removes:

- ``mixed``: the role's bands give the *shape* (their relative ranks and bits: by default 1 %,
  5 % and 30 % of the spectrum at 8, 4 and 2 bits); the allocator chooses each tensor's total
  rank K and splits it in those proportions. Component i at b bits costs its float32 σ, its two
  b-bit vectors and their float16 group scales / zeros, and leaves ``σ_i² ε_b`` of error, where
  ``ε_b`` is the measured round-to-nearest error of this tensor's leading singular vectors at b
  bits (a dropped component leaves ``σ_i²``). (Letting every component pick its own bits by this
  error model favours fewer 3-4-bit components, which kept less of the skills in
  benchmarks/compression.py than the paper's mostly-2-bit shape.)
- ``lowrank``: component i costs ``(m + n)`` values and removes ``σ_i²``;
- ``prune``: entry j costs a value and an index and removes ``Δ_j²``;
- ``exact``: fixed cost.

With calibration statistics the errors are measured where they matter, in the module's output
per token: component i's ``σ_i²`` becomes ``σ_i² v_iᵀ H v_i`` (``H`` the second moment of the
module's input) and entry (j, k) weighs ``Δ_jk² H_kk``; an embedding's rows are weighted by how
often their token occurs. Without it, plain squared Frobenius error.

Errors are taken relative to each tensor's own (weighted) energy, so every tensor counts alike.

The allocation minimises ``error + λ · bytes`` for every tensor independently (the greedy "error
removed per byte" order, taken all at once) and bisects λ so that the total lands just under
the budget; a mixed tensor's size moves in steps (whole components), so the bytes λ leaves
unspent then go, greedily, to the steps that remove the most error per byte and still fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from graftbuild.compress.codecs._common import DTYPE_NBYTES, svd
from graftbuild.compress.profiles import DEFAULT_PROFILE
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
    costs: list[int] = field(default_factory=list)  # lowrank / prune: bytes of one unit
    # mixed: the band shape (cumulative shares, bits per band) and, for every total rank K,
    # its bytes and its error
    cumshape: list[float] = field(default_factory=list)
    bits: list[int] = field(default_factory=list)
    cand_cost: Any = None
    cand_err: Any = None

    def choose(self, lam: float) -> tuple[int, dict[str, Any]]:
        """(bytes, codec spec) minimising ``error + lam · bytes`` for this tensor."""
        import torch

        if self.method == "mixed":
            return self.mixed_at(int(torch.argmin(self.cand_err + lam * self.cand_cost)))
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

    def mixed_at(self, index: int) -> tuple[int, dict[str, Any]]:
        """(bytes, codec spec) of a mixed tensor at total rank ``index + 1``."""
        k = index + 1
        cuts = [0, *(min(k, round(k * c)) for c in self.cumshape[:-1]), k]
        bands = [
            {"rank": b - a, "bits": bits}
            for a, b, bits in zip(cuts[:-1], cuts[1:], self.bits, strict=True)
            if b > a
        ]
        return int(self.cand_cost[index]), {**self.spec, "bands": bands}


def _mixed_costs(m: int, n: int, group_size: int) -> list[int]:
    groups = n_groups(m, group_size) + n_groups(n, group_size)
    return [4 + math.ceil((m + n) * b / 8) + 4 * groups for b in MIXED_BITS]


def _relative(energy: torch.Tensor, total: float) -> torch.Tensor:
    """Errors as shares of the tensor's own (weighted) energy: every tensor counts alike."""
    return energy / total if total > 0 else energy


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
        energy = _relative(energy, float(energy.sum()))
        if method == "lowrank":
            unit = (m + n) * DTYPE_NBYTES[spec.get("dtype") or "float16"]
            return RateProfile(name, method, spec, shape, energy=energy, costs=[unit])
        g = int(spec.get("group_size") or 128)
        top = min(64, s.numel())
        eps = {}
        for b in MIXED_BITS:
            ue = dequantize(quantize_rtn(u[:, :top].T, b, g)) - u[:, :top].T
            ve = dequantize(quantize_rtn(vh[:top], b, g)) - vh[:top]
            eps[b] = float((ue.pow(2).sum() + ve.pow(2).sum()) / top)
        full = s.numel()
        shape_bands = spec.get("bands") or DEFAULT_PROFILE["mlp"]["bands"]
        shares = [b.get("rank") or b["fraction"] * full for b in shape_bands]
        bits = [int(b["bits"]) for b in shape_bands]
        cum = torch.tensor(shares, dtype=torch.float64).cumsum(0) / sum(shares)
        ks = torch.arange(1, full + 1, dtype=torch.float64)
        cuts = torch.round(ks[:, None] * cum[None, :]).clamp_(max=ks[:, None])
        cuts[:, -1] = ks
        cuts = torch.cat([torch.zeros(full, 1, dtype=torch.float64), cuts], 1).long()
        cum_e = torch.cat([torch.zeros(1, dtype=torch.float64), energy.cumsum(0)])
        unit = dict(zip(MIXED_BITS, _mixed_costs(m, n, g), strict=True))
        err = cum_e[-1] - cum_e[cuts[:, -1]]
        cost = torch.zeros(full, dtype=torch.float64)
        for j, b in enumerate(bits):
            err += eps[b] * (cum_e[cuts[:, j + 1]] - cum_e[cuts[:, j]])
            cost += unit[b] * (cuts[:, j + 1] - cuts[:, j])
        err[cost > 4 * m * n] = math.inf  # the codec would store those exactly
        return RateProfile(
            name, method, spec, shape, cumshape=cum.tolist(), bits=bits, cand_cost=cost,
            cand_err=err,
        )  # fmt: skip
    if method == "prune" and numel > 0:
        sq = delta.double().pow(2)
        if weight is not None and weight.ndim == 2:
            sq = sq * torch.diagonal(weight).double()[None, :]
        elif weight is not None:
            sq = sq * weight.double()[:, None]
        sq = _relative(sq.reshape(-1).sort(descending=True).values.cpu(), float(sq.sum()))
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

    import torch

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
    chosen = {p.name: p.choose(hi) for p in profiles}
    # A mixed tensor's sizes come in steps (whole components in every band), so λ alone can
    # stop short of the budget: spend what is left on the steps that remove the most error per
    # byte among those that still fit.
    mixed = [p for p in profiles if p.method == "mixed"]
    index = {p.name: int(torch.argmin(p.cand_err + hi * p.cand_cost)) for p in mixed}
    left = target - sum(nbytes for nbytes, _ in chosen.values())
    while mixed:
        best: tuple[float, RateProfile, int] | None = None
        for p in mixed:
            i = index[p.name]
            extra = p.cand_cost[i + 1 :] - p.cand_cost[i]
            gain = (p.cand_err[i] - p.cand_err[i + 1 :]) / extra.clamp(min=1)
            gain[(extra > left) | (extra <= 0)] = -math.inf
            if gain.numel() and float(gain.max()) > 0:
                j = int(torch.argmax(gain))
                if best is None or float(gain[j]) > best[0]:
                    best = (float(gain[j]), p, i + 1 + j)
        if best is None:
            break
        _, p, j = best
        left -= int(p.cand_cost[j] - p.cand_cost[index[p.name]])
        index[p.name] = j
        chosen[p.name] = p.mixed_at(j)
    return {name: spec for name, (_, spec) in chosen.items()}


def fp16_delta_nbytes(shapes: list[tuple[int, ...]]) -> int:
    """Bytes of the whole delta in float16: the unit budgets are expressed in."""
    return sum(2 * math.prod(s) for s in shapes)
