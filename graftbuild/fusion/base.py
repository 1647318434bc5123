"""The fusion-strategy contract: how decoded pack deltas combine into one tensor.

A strategy sees one tensor at a time (the fuse step streams the model), so it can never need two
full models in memory. Strategies import torch inside functions: recipes validate their options
while planning, which must not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import torch


class StrategyParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Strategy(Protocol):
    name: ClassVar[str]
    version: ClassVar[int]
    Params: ClassVar[type[StrategyParams]]

    def combine(
        self,
        base: torch.Tensor,
        deltas: list[torch.Tensor | None],
        weights: list[float],
        params: StrategyParams,
        tensor_name: str,
    ) -> torch.Tensor:
        """The fused float32 tensor. ``deltas[i]`` is None where pack i leaves the tensor alone."""
        ...
