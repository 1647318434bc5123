"""``linear``: a weighted average of the packs' models, Σ wᵢ θᵢ / Σ wᵢ (model soups, Wortsman
et al. 2022, arXiv 2203.05482). θᵢ = θ + Δ̂ᵢ: the base itself is an input only as a pack of its
own (a source whose path is the base); ``normalize = false`` gives the plain weighted sum."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from graftbuild.fusion.mkbase import MergekitStrategy
from graftbuild.fusion.schedule import MergeParams, Param

if TYPE_CHECKING:
    import torch


class LinearParams(MergeParams):
    SPEC = (
        Param("weight", "float", "input", required=True),
        Param("normalize", "bool", "shared", True),
    )


class LinearStrategy(MergekitStrategy):
    name: ClassVar[str] = "linear"
    Params = LinearParams
    needs_models = True

    def merge(
        self,
        base: torch.Tensor,
        deltas: list[torch.Tensor | None],
        shared: dict[str, Any],
        per: list[dict[str, Any]],
        tensor_name: str,
        seed: int,
    ) -> torch.Tensor:
        import torch

        out = torch.zeros_like(base)
        total = 0.0
        for d, p in zip(deltas, per, strict=True):
            w = float(p["weight"])
            total += w
            out.add_(base if d is None else base + d, alpha=w)  # one θᵢ at a time
        if shared["normalize"]:
            out.div_(total)
        return out
