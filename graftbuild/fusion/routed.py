"""``routed``: packs kept separate in a bundle, activated per request by an automatic router.

θ_fused = θ + Σᵢ R(Δ̂ᵢ): the fuse node writes a bundle folder (the base model, the packs and a
router; see ``graftbuild/steps/bundle.py``) instead of one set of weights, and
``graftbuild.runtime.GraftedModel`` switches packs in place. Adding a pack never rewrites the
others, so nothing is forgotten. ``combine`` is what the bundle computes with every pack active.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from graftbuild.fusion.base import StrategyParams
from graftbuild.fusion.sum import SumStrategy

if TYPE_CHECKING:
    import torch


class RoutedParams(StrategyParams):
    prompts: dict[str, str] = Field(default_factory=dict)
    """Pack name -> prompts the router learns that pack from (a .txt or .jsonl file, relative to
    the recipe). Default: the source's finetune data."""
    base_prompts: str | None = None
    """Prompts of the base model's own domain: the router sends inputs like these to no pack."""
    samples: int = Field(default=256, gt=0)
    """Prompts per class read from each file (the first ones)."""
    seq_len: int = Field(default=64, gt=0)
    """Tokens of a prompt the router looks at."""
    field: str = "text"
    """For .jsonl prompt files: the field holding the text."""


class RoutedStrategy:
    name: ClassVar[str] = "routed"
    version: ClassVar[int] = 1
    Params: ClassVar[type[StrategyParams]] = RoutedParams
    bundle: ClassVar[bool] = True
    """The fuse node builds a bundle (``steps/bundle.py``), not a per-tensor merge."""

    def combine(
        self,
        base: torch.Tensor,
        deltas: list[torch.Tensor | None],
        weights: list[float],
        params: StrategyParams,
        tensor_name: str,
    ) -> torch.Tensor:
        return SumStrategy().combine(base, deltas, weights, params, tensor_name)
