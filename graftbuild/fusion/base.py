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


# Optional: a strategy whose result is a left fold over the deltas (``sum``) may also define
#
#     def fold(self, acc, delta, weight, params, tensor_name) -> torch.Tensor
#
# returning ``acc`` updated with one delta (in place is allowed: the fuse step owns ``acc``,
# which starts as a fresh float32 copy of the base tensor). The fuse step then decodes one pack's
# delta at a time, so a tensor's working set is two copies instead of one per pack plus two.
# It must give the same bytes as ``combine``. Such a strategy may also define
#
#     def fold_first(self, base, delta, weight, params, tensor_name, out) -> torch.Tensor
#
# for the first delta of a tensor: ``base`` must not be modified (it may be a mapping of the
# base model's file), ``out`` is a fresh float32 buffer shaped like it, and the result must equal
# ``fold(base as float32, delta, ...)``. It saves copying the base into the accumulator first.
# A folding strategy whose ``fold`` works entry by entry and in place may set
# ``elementwise = True``: the fuse then folds a reference pack's delta piece by piece
# (``PackReader.delta_chunks``) instead of computing a whole tensor-sized delta first.
#
# Optional too: ``bind(params, pack_options, base_config, weights)`` returning the object the
# fuse step then passes as ``params`` to ``combine``: the mergekit-named strategies
# (``mkbase.MergekitStrategy``) bind their per-pack settings and the base's layer count there,
# so a parameter can change by tensor name and layer (``schedule.py``).
