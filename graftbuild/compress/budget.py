"""Size budgets: choose every tensor's ranks, bands and keep fraction so that a pack fits a
byte budget with the least total error.

Each tensor keeps the method its role gives it; only its size parameters are chosen. What a
tensor can offer (bytes against the error they remove) is its codec's *rate model*
(``codec.rate``, in the codec's own module): ``lowrank`` components cost ``(m + n)`` values and
remove ``σ_i²``; ``prune`` entries cost a value and an index and remove ``Δ_j²``; ``mixed``
offers one candidate per total rank, split in the role's band shape; ``exact`` is a fixed cost.

With calibration statistics the errors are measured where they matter, in the module's output
per token (``H``, the second moment of the module's input; for an embedding, token
frequencies); without, plain squared Frobenius error. Errors are taken relative to each tensor's
own (weighted) energy, so every tensor counts alike.

The allocation minimises ``error + λ · bytes`` for every tensor independently (the greedy "error
removed per byte" order, taken all at once) and bisects λ so that the total lands just under
the budget. Rate models whose sizes come in steps (``DiscreteRate``: whole components in every
band) can stop short of the budget: the bytes λ leaves unspent then go, greedily, to the steps
that remove the most error per byte and still fit.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from graftbuild.compress.codecs import get_codec
from graftbuild.compress.codecs.base import DiscreteRate, FixedRate, RateProfile
from graftbuild.errors import UserError

if TYPE_CHECKING:
    import torch


def rate_profile(
    name: str, delta: torch.Tensor, spec: dict[str, Any], weight: torch.Tensor | None = None
) -> RateProfile:
    """The allocator's view of one float32 delta under its role's codec spec (the codec's rate
    model). ``weight``: the module's input second moment ``H`` (n × n), or per-row weights (m,
    for an embedding: token frequencies), or None for plain Frobenius error."""
    shape = tuple(delta.shape)
    if weight is not None and not (
        delta.ndim == 2
        and (
            (weight.ndim == 2 and tuple(weight.shape) == (shape[1], shape[1]))
            or (weight.ndim == 1 and weight.shape[0] == shape[0])
        )
    ):
        weight = None  # statistics that do not fit this tensor: Frobenius error
    codec = get_codec(spec["method"])
    rate = getattr(codec, "rate", None)
    if rate is None:
        raise UserError(
            f"tensor {name!r}: codec {codec.name!r} has no rate model, so it cannot be used in a "
            "profile with `budget`; give the role another method or drop the budget"
        )
    return rate(name, delta, spec, weight)


def allocate(
    profiles: list[RateProfile], target: int, floors: dict[str, int] | None = None
) -> dict[str, dict[str, Any]]:
    """Codec spec of every tensor (``allocate_sized`` without the bytes)."""
    return {name: spec for name, (_, spec) in allocate_sized(profiles, target, floors).items()}


def allocate_sized(
    profiles: list[RateProfile], target: int, floors: dict[str, int] | None = None
) -> dict[str, tuple[int, dict[str, Any]]]:
    """(bytes, codec spec) of every tensor so that the summed payload is as close to
    ``target`` bytes as the units allow without exceeding it (or the smallest possible, if that
    is bigger).

    ``floors``: bytes below which a tensor is not cut however little its error weighs (each
    tensor's λ is capped at the price where it still gets them)."""
    caps = {p.name: _floor_price(p, floors[p.name]) for p in profiles if p.name in (floors or {})}

    def price(p: RateProfile, lam: float) -> float:
        return min(lam, caps.get(p.name, math.inf))

    def total(lam: float) -> int:
        return sum(p.choose(price(p, lam))[0] for p in profiles)

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
    chosen = {p.name: p.choose(price(p, hi)) for p in profiles}
    # A profile whose size jumps at the final price (a codec switch, a large step) can leave
    # bytes unspent: take its choice just below the price where it fits, most error removed
    # per byte first.
    left = target - sum(nbytes for nbytes, _ in chosen.values())
    jumps = []
    for p in profiles:
        if isinstance(p, DiscreteRate):
            continue
        up_bytes, up_err, up_spec = p.point(price(p, lo))
        now_bytes, now_err, _ = p.point(price(p, hi))
        if up_bytes > now_bytes:
            gain = (now_err - up_err) / (up_bytes - now_bytes)
            jumps.append((-gain, p.name, up_bytes - now_bytes, up_bytes, up_spec))
    for _, name, extra, up_bytes, up_spec in sorted(jumps, key=lambda j: (j[0], j[1])):
        if extra <= left:
            chosen[name] = (up_bytes, up_spec)
            left -= extra
    # Sizes that come in steps (whole components in every band) can stop λ short of the
    # budget: spend what is left on the steps that remove the most error per byte among those
    # that still fit.
    stepped = [p for p in profiles if isinstance(p, DiscreteRate)]
    index = {p.name: p.index(price(p, hi)) for p in stepped}
    left = target - sum(nbytes for nbytes, _ in chosen.values())
    while stepped:
        best: tuple[float, DiscreteRate, int] | None = None
        for p in stepped:
            i = index[p.name]
            extra = p.cost[i + 1 :] - p.cost[i]
            gain = (p.err[i] - p.err[i + 1 :]) / extra.clamp(min=1)
            gain[(extra > left) | (extra <= 0)] = -math.inf
            if gain.numel() and float(gain.max()) > 0:
                j = int(torch.argmax(gain))
                if best is None or float(gain[j]) > best[0]:
                    best = (float(gain[j]), p, i + 1 + j)
        if best is None:
            break
        _, p, j = best
        left -= int(p.cost[j] - p.cost[index[p.name]])
        index[p.name] = j
        chosen[p.name] = p.at(j)
    if len(profiles) > 1:
        _fill(profiles, chosen, target, price, hi)
    return chosen


def _fill(
    profiles: list[RateProfile],
    chosen: dict[str, tuple[int, dict[str, Any]]],
    target: int,
    price: Any,
    lam: float,
) -> None:
    """Spend what is left of ``target`` on the tensors (not in steps) whose best encoding
    within their bytes plus what is left removes the most error per byte, a few rounds."""
    errors = {
        p.name: p.point(price(p, lam))[1] for p in profiles if not isinstance(p, DiscreteRate)
    }
    for _ in range(8):
        left = target - sum(nbytes for nbytes, _ in chosen.values())
        if left <= 0:
            return
        best: tuple[float, str, int, float, dict[str, Any]] | None = None
        for p in profiles:
            if p.name not in errors:
                continue
            now = chosen[p.name][0]
            nbytes, spec = allocate_sized([p], now + left)[p.name]
            if nbytes <= now:
                continue
            err = _error_at(p, nbytes)
            gain = (errors[p.name] - err) / (nbytes - now)
            if gain > 0 and (best is None or gain > best[0]):
                best = (gain, p.name, nbytes, err, spec)
        if best is None:
            return
        _, name, nbytes, err, spec = best
        chosen[name] = (nbytes, spec)
        errors[name] = err


def _error_at(p: RateProfile, nbytes: int) -> float:
    """The error of ``p``'s largest encoding of at most ``nbytes`` bytes."""
    lo, hi = 1e-30, 1e30
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if p.point(mid)[0] > nbytes:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-9:
            break
    return p.point(hi)[1]


def fp16_delta_nbytes(shapes: list[tuple[int, ...]]) -> int:
    """Bytes of the whole delta in float16: the unit budgets are expressed in."""
    return sum(2 * math.prod(s) for s in shapes)


def _floor_price(p: RateProfile, floor: int) -> float:
    """The largest price of a byte at which ``p`` still takes at least ``floor`` bytes (inf
    when it takes them at any price; its bytes fall as the price rises)."""
    if floor <= 0 or p.choose(1e30)[0] >= floor:
        return math.inf
    lo, hi = 1e-30, 1e30
    if p.choose(lo)[0] < floor:
        return lo  # it cannot reach the floor: give it all it can take
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if p.choose(mid)[0] >= floor:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-6:
            break
    return lo


class Weighted(RateProfile):
    """``inner`` with its errors multiplied by ``weight`` (the tensor's effect on the loss):
    minimising ``w · err + λ · bytes`` is ``inner`` at price ``λ / w``."""

    def __init__(self, inner: RateProfile, weight: float) -> None:
        super().__init__(inner.name, inner.spec, inner.shape)
        self.inner, self.weight = inner, max(weight, 1e-30)

    def point(self, lam: float) -> tuple[int, float, dict[str, Any]]:
        nbytes, err, spec = self.inner.point(lam / self.weight)
        return nbytes, err * self.weight, spec


class Choice(RateProfile):
    """One tensor, several codecs: at every price the alternative with the least
    ``error + λ · bytes`` (errors must be on one scale: each codec's share of the same
    weighted energy)."""

    def __init__(self, alternatives: list[RateProfile]) -> None:
        first = alternatives[0]
        super().__init__(first.name, first.spec, first.shape)
        self.alternatives = alternatives

    def point(self, lam: float) -> tuple[int, float, dict[str, Any]]:
        return min(
            (p.point(lam) for p in self.alternatives), key=lambda c: (c[1] + lam * c[0], c[0])
        )


def weigh(profile: RateProfile, weight: float) -> RateProfile:
    """``profile`` with its errors scaled by ``weight`` (step profiles scaled in place, so the
    allocator still fills their steps)."""
    if isinstance(profile, DiscreteRate):
        profile.err = profile.err * max(weight, 1e-30)
        return profile
    if isinstance(profile, FixedRate):
        return profile
    return Weighted(profile, weight)


def uniform_split(profiles: list[RateProfile], target: int) -> dict[str, dict[str, Any]]:
    """GraftLLM's uniform split: what the fixed-size tensors leave is shared out in proportion
    to every other tensor's size, and each tensor spends its share on its own."""
    fixed = [p for p in profiles if isinstance(p, FixedRate)]
    free = [p for p in profiles if not isinstance(p, FixedRate)]
    left = max(0, target - sum(p.nbytes for p in fixed))
    entries = sum(math.prod(p.shape) for p in free) or 1
    specs = {p.name: p.spec for p in fixed}
    carry = 0  # what a tensor's steps left unspent goes to the next one
    sized: dict[str, tuple[int, dict[str, Any]]] = {}
    for p in free:
        share = int(left * math.prod(p.shape) / entries) + carry
        sized[p.name] = allocate_sized([p], share)[p.name]
        carry = max(0, share - sized[p.name][0])
    # the last tensors' steps can still leave bytes: one more pass, each tensor in turn
    # taking the largest encoding that fits its bytes plus what is left
    for p in free:
        if carry <= 0:
            break
        now = sized[p.name][0]
        more = allocate_sized([p], now + carry)[p.name]
        if more[0] > now:
            carry -= more[0] - now
            sized[p.name] = more
    return specs | {name: spec for name, (_, spec) in sized.items()}


def uniform_floors(profiles: list[RateProfile], target: int, share: float) -> dict[str, int]:
    """``share`` of each tensor's uniform-split bytes: the floor no tensor goes below."""
    fixed = sum(p.nbytes for p in profiles if isinstance(p, FixedRate))
    entries = sum(math.prod(p.shape) for p in profiles if not isinstance(p, FixedRate)) or 1
    left = max(0, target - fixed)
    return {
        p.name: int(share * left * math.prod(p.shape) / entries)
        for p in profiles
        if not isinstance(p, FixedRate)
    }


def seeded(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A ``sparse`` spec's seed offset by tensor ``name``'s CRC-32, so masks differ between
    tensors (and never between builds); other specs as they are."""
    import zlib

    if spec.get("method") != "sparse":
        return spec
    offset = zlib.crc32(name.encode("utf-8"))
    return {**spec, "seed": (int(spec.get("seed") or 0) + offset) % 2**31}


FLOOR_SHARE = 0.25
"""A tensor never gets less than this share of its uniform-split bytes: the loss-aware
allocator may starve tensors whose measured effect is small, not silence them."""

MIXABLE = ("lowrank", "mixed", "sparse", "prune")
"""Codecs a matrix may take instead of its role's method under a profile's ``mix``."""


def coherence(delta: torch.Tensor, weight: torch.Tensor | None) -> float:
    """``Σ Δ_jk² H_kk / tr(Δ H Δᵀ)``: a diagonally weighted energy (what a per-entry codec's
    error is measured in) as a share of the fully weighted one (what a spectral codec's is); 1
    without input statistics."""
    if weight is None or weight.ndim != 2 or delta.ndim != 2:
        return 1.0
    d, w = delta.double(), weight.double().to(delta.device)
    import torch

    full = float(((d @ w) * d).sum())
    diag = float((d.pow(2) * torch.diagonal(w)[None, :]).sum())
    return diag / full if full > 0 else 1.0


def loss_aware_profile(
    name: str,
    delta: torch.Tensor,
    spec: dict[str, Any],
    statistics: torch.Tensor | None,
    sensitivity: float | None,
    mix: list[str],
) -> RateProfile:
    """One tensor's rate profile for the loss-aware allocator: its role's codec and, for a
    matrix, each codec of ``mix`` (the cheapest in error + λ · bytes wins at every price), all
    errors as shares of the tensor's (input-weighted) energy, then scaled by ``sensitivity``
    (its delta's effect on the loss; None: every tensor alike)."""
    from graftbuild.compress.codecs import parse_spec

    profile = rate_profile(name, delta, spec, statistics)
    if delta.ndim == 2 and min(delta.shape) > 0 and not isinstance(profile, FixedRate):
        alternatives = [profile]
        fitted = statistics if _fits(delta, statistics) else None
        for method in mix:
            if method == spec["method"]:
                continue
            if method not in MIXABLE:
                raise UserError(
                    f"mix: {method!r} cannot share a budget with other codecs; "
                    f"use some of {', '.join(MIXABLE)}"
                )
            extra: dict[str, Any] = {"keep": 1.0} if method in ("sparse", "prune") else {}
            codec, params = parse_spec({"method": method, **extra})
            alt_spec = seeded(name, {"method": codec.name, **params.model_dump(mode="json")})
            alt = rate_profile(name, delta, alt_spec, statistics)
            if method == "prune":  # prune's errors are shares of the diagonal energy
                alt = weigh(alt, coherence(delta, fitted))
            alternatives.append(alt)
        if len(alternatives) > 1:
            profile = Choice(alternatives)
    if sensitivity is not None:
        profile = weigh(profile, sensitivity)
    return profile


def _fits(delta: torch.Tensor, weight: torch.Tensor | None) -> bool:
    return (
        weight is not None
        and delta.ndim == 2
        and weight.ndim == 2
        and tuple(weight.shape) == (delta.shape[1], delta.shape[1])
    )
