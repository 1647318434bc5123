"""``ties``: TIES-merging (Yadav et al. 2023, arXiv 2306.01708): trim, elect sign, disjoint mean.

Each weighted delta ``wᵢ Δ̂ᵢ`` keeps its ``density`` fraction of largest-magnitude entries; the
elected sign of an entry is the sign of the sum of the trimmed deltas; the merged delta is the mean
of the trimmed entries that agree with it (entries no pack keeps stay zero), scaled by ``scale``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from graftbuild.fusion.base import StrategyParams
from graftbuild.weights.memory import empty_like

if TYPE_CHECKING:
    import torch

_EXACT_BELOW = 1 << 20  # entries: smaller tensors take torch.kthvalue directly
_SAMPLE = 1 << 16


class TiesParams(StrategyParams):
    density: float = Field(default=0.2, gt=0, le=1)
    """Fraction of each delta's entries kept (by magnitude) before the sign election."""
    scale: float = 1.0
    """λ: the merged delta is multiplied by this."""


def kth_largest(mag: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest value of a 1-D tensor (1 ≤ k ≤ numel), exactly, as a 0-d tensor.

    ``torch.kthvalue`` over a whole embedding (tens of millions of entries) takes seconds; a
    sorted, evenly strided sample brackets the answer instead, and only the entries inside the
    bracket (a few hundredths of the tensor) go through ``kthvalue``. Everything above the
    bracket is counted, so the answer is exact; a bracket that misses falls back to the whole.
    """
    import torch

    n = mag.numel()
    if n < _EXACT_BELOW:
        return torch.kthvalue(mag, n - k + 1).values
    sample = mag[:: n // _SAMPLE].sort(descending=True).values
    m = sample.numel()
    pos = k * m / n  # where the answer falls in the sample
    margin = 4 * pos**0.5 + 16
    hi = sample[max(0, int(pos - margin))]
    lo = sample[min(m - 1, int(pos + margin))]
    above = int(torch.count_nonzero(mag > hi))
    if above < k:
        inside = mag[(mag >= lo) & (mag <= hi)]
        want = k - above  # the answer is the want-th largest inside the bracket
        if want <= inside.numel():
            return torch.kthvalue(inside, inside.numel() - want + 1).values
    return torch.kthvalue(mag, n - k + 1).values


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ``round(density · numel)`` largest-magnitude entries zeroed (at
    least one kept); equal magnitudes at the threshold go to the lower index. In place: pass a
    tensor that may be overwritten."""
    import torch

    n = delta.numel()
    k = max(1, round(density * n))
    if k >= n:
        return delta
    flat = delta.view(-1)
    mag = torch.abs(flat, out=empty_like(flat))
    threshold = kth_largest(mag, k)
    drop = torch.lt(mag, threshold, out=empty_like(mag, torch.bool))
    kept = n - int(torch.count_nonzero(drop))  # >= k: the threshold's ties are all still in
    if kept > k:  # drop the surplus ties, highest index first
        ties = (mag == threshold).nonzero().squeeze(1)
        drop[ties[ties.numel() - (kept - k) :]] = True
    del mag
    return flat.masked_fill_(drop, 0).view_as(delta)


class TiesStrategy:
    name: ClassVar[str] = "ties"
    version: ClassVar[int] = 2  # 2: ties at the trim threshold go to the lower index
    Params: ClassVar[type[StrategyParams]] = TiesParams

    def combine(
        self,
        base: torch.Tensor,
        deltas: list[torch.Tensor | None],
        weights: list[float],
        params: StrategyParams,
        tensor_name: str,
    ) -> torch.Tensor:
        """Works in a few tensors of its own, allocated through ``memory.empty_like`` (filling
        fresh memory is the largest cost on a CPU) and reused in place."""
        import torch

        assert isinstance(params, TiesParams)
        trimmed = [
            trim(torch.mul(d, w, out=empty_like(d)), params.density)
            for d, w in zip(deltas, weights, strict=True)
            if d is not None
        ]
        if not trimmed:
            return base.clone()
        sign = (
            trimmed[0].clone()
            if len(trimmed) == 1
            else torch.add(*trimmed[:2], out=empty_like(base))
        )
        for t in trimmed[2:]:
            sign.add_(t)
        sign.sign_()
        sign.masked_fill_(sign == 0, float("nan"))  # no elected sign: nothing agrees with NaN
        merged = empty_like(base).zero_()
        count = empty_like(base).zero_()
        agree = empty_like(base)
        for t in trimmed:
            torch.sign(t, out=agree).eq_(sign)  # 1.0 where t is nonzero with the elected sign
            merged.add_(t.mul_(agree))
            count.add_(agree)
        del agree, sign, trimmed
        merged.div_(count.clamp_(min=1))
        return merged.mul_(params.scale).add_(base)  # = base + scale * merged, bit for bit
