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
from graftbuild.compress.codecs.base import DiscreteRate, RateProfile
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
    # Sizes that come in steps (whole components in every band) can stop λ short of the
    # budget: spend what is left on the steps that remove the most error per byte among those
    # that still fit.
    stepped = [p for p in profiles if isinstance(p, DiscreteRate)]
    index = {p.name: p.index(hi) for p in stepped}
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
    return {name: spec for name, (_, spec) in chosen.items()}


def fp16_delta_nbytes(shapes: list[tuple[int, ...]]) -> int:
    """Bytes of the whole delta in float16: the unit budgets are expressed in."""
    return sum(2 * math.prod(s) for s in shapes)
