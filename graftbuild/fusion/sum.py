"""``sum``: task arithmetic, θ + Σ wᵢ Δ̂ᵢ in the declared order."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from graftbuild.fusion.base import StrategyParams

if TYPE_CHECKING:
    import torch


class SumStrategy:
    name: ClassVar[str] = "sum"
    version: ClassVar[int] = 1
    elementwise: ClassVar[bool] = True
    """``fold`` works entry by entry, in place: it may be applied to pieces of a tensor."""

    class Params(StrategyParams):
        pass

    def combine(
        self,
        base: torch.Tensor,
        deltas: list[torch.Tensor | None],
        weights: list[float],
        params: StrategyParams,
        tensor_name: str,
    ) -> torch.Tensor:
        out = base.clone()
        for delta, w in zip(deltas, weights, strict=True):
            if delta is not None:
                out.add_(delta, alpha=w)
        return out

    def fold(
        self,
        acc: torch.Tensor,
        delta: torch.Tensor,
        weight: float,
        params: StrategyParams,
        tensor_name: str,
    ) -> torch.Tensor:
        """The streaming form of ``combine``, one delta at a time, in place (same bytes)."""
        return acc.add_(delta, alpha=weight)

    def fold_first(
        self,
        base: torch.Tensor,
        delta: torch.Tensor,
        weight: float,
        params: StrategyParams,
        tensor_name: str,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """``fold`` into a fresh ``out`` (same kernel, same bytes), reading ``base`` once."""
        import torch

        return torch.add(base, delta, alpha=weight, out=out)
