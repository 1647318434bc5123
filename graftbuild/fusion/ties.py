"""``ties``: TIES-merging (Yadav et al. 2023, arXiv 2306.01708): trim, elect sign, disjoint mean.

Each weighted delta ``wᵢ Δ̂ᵢ`` keeps its ``density`` fraction of largest-magnitude entries; the
elected sign of an entry is the sign of the sum of the trimmed deltas; the merged delta is the mean
of the trimmed entries that agree with it (entries no pack keeps stay zero), scaled by ``scale``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from graftbuild.fusion.base import StrategyParams

if TYPE_CHECKING:
    import torch


class TiesParams(StrategyParams):
    density: float = Field(default=0.2, gt=0, le=1)
    """Fraction of each delta's entries kept (by magnitude) before the sign election."""
    scale: float = 1.0
    """λ: the merged delta is multiplied by this."""


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ``density`` fraction of largest-magnitude entries zeroed."""
    import torch

    k = max(1, round(density * delta.numel()))
    if k >= delta.numel():
        return delta
    flat = delta.abs().reshape(-1)
    # Deterministic tie-breaking: topk on CPU float32 returns a fixed set for equal inputs.
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, k, sorted=False).indices] = True
    return delta * keep.view_as(delta)


class TiesStrategy:
    name: ClassVar[str] = "ties"
    version: ClassVar[int] = 1
    Params: ClassVar[type[StrategyParams]] = TiesParams

    def combine(
        self,
        base: torch.Tensor,
        deltas: list[torch.Tensor | None],
        weights: list[float],
        params: StrategyParams,
        tensor_name: str,
    ) -> torch.Tensor:
        import torch

        assert isinstance(params, TiesParams)
        trimmed = [
            trim(d * w, params.density)
            for d, w in zip(deltas, weights, strict=True)
            if d is not None
        ]
        if not trimmed:
            return base.clone()
        stack = torch.stack(trimmed)
        sign = torch.sign(stack.sum(dim=0))
        agree = (torch.sign(stack) == sign) & (stack != 0)
        count = agree.sum(dim=0).clamp(min=1)
        merged = (stack * agree).sum(dim=0) / count
        return base + params.scale * merged
