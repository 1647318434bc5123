"""``passthrough``: one pack's model as it is, optionally times ``scale`` per tensor (mergekit's
``passthrough``; with ``slices``, the way layers are stacked, see docs/FUSION.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from graftbuild.fusion.mkbase import MergekitStrategy, model
from graftbuild.fusion.schedule import MergeParams, Param

if TYPE_CHECKING:
    import torch


class PassthroughParams(MergeParams):
    SPEC = (Param("scale", "float", "input", None),)


class PassthroughStrategy(MergekitStrategy):
    name: ClassVar[str] = "passthrough"
    Params = PassthroughParams
    needs_models = True
    min_packs = max_packs = 1

    def merge(
        self,
        base: torch.Tensor,
        deltas: list[torch.Tensor | None],
        shared: dict[str, Any],
        per: list[dict[str, Any]],
        tensor_name: str,
        seed: int,
    ) -> torch.Tensor:
        out = model(base, deltas[0])
        scale = per[0]["scale"]
        return out if scale is None else out * float(scale)
