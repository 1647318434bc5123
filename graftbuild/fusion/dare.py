"""``dare``: Drop And REscale (Yu et al. 2023, arXiv 2311.03099), then a weighted sum.

Each pack's delta loses a random ``drop`` fraction of its entries and the rest are divided by
``1 - drop`` (the expected delta is unchanged). The mask is seeded by ``seed``, the tensor's name
and the pack's position, so the same recipe always gives the same bytes, whatever order tensors
are visited in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from graftbuild.fusion.base import StrategyParams

if TYPE_CHECKING:
    import torch


class DareParams(StrategyParams):
    drop: float = Field(default=0.9, ge=0, lt=1)
    """Probability of dropping each delta entry."""
    seed: int = 0


def mask_seed(seed: int, tensor_name: str, pack_index: int) -> int:
    """A 63-bit seed from the recipe seed, the tensor name and the pack's position."""
    import xxhash

    return xxhash.xxh3_64_intdigest(f"{seed}\0{pack_index}\0{tensor_name}".encode()) >> 1


def drop_and_rescale(delta: torch.Tensor, drop: float, seed: int) -> torch.Tensor:
    import torch

    if drop == 0:
        return delta
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(delta.shape, generator=gen) >= drop
    return delta * keep / (1.0 - drop)


class DareStrategy:
    name: ClassVar[str] = "dare"
    version: ClassVar[int] = 1
    Params: ClassVar[type[StrategyParams]] = DareParams

    def combine(
        self,
        base: torch.Tensor,
        deltas: list[torch.Tensor | None],
        weights: list[float],
        params: StrategyParams,
        tensor_name: str,
    ) -> torch.Tensor:
        assert isinstance(params, DareParams)
        out = base.clone()
        for i, (d, w) in enumerate(zip(deltas, weights, strict=True)):
            if d is not None:
                kept = drop_and_rescale(d, params.drop, mask_seed(params.seed, tensor_name, i))
                out.add_(kept, alpha=w)
        return out
