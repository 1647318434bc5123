"""``routed``: packs kept separate in a bundle, activated per request by an automatic router.

θ_fused = θ + Σᵢ R(Δ̂ᵢ): the fuse node writes a bundle folder (the base model, the packs and a
router; see ``graftbuild/steps/bundle.py``) instead of one set of weights, and
``graftbuild.runtime.GraftedModel`` switches packs in place. Adding a pack never rewrites the
others, so nothing is forgotten. ``combine`` is what the bundle computes with every pack active.

The router chooses among options: no pack, each pack, and weighted mixes of packs (``mixes``;
the sum with the fuse's weights, which is ``combine``). Which option serves a domain is measured
in the build, on held-out prompts of every domain, the base's own included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

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
    """Prompts of the base model's own (general) domain, the domain named ``base``: the router
    learns it as a class and sends inputs like these to whichever option does best on it."""
    domains: dict[str, str] = Field(default_factory=dict)
    """More domains that have no pack of their own (name -> prompts file), e.g. ``chat``: each
    is a class of the router, mapped like ``base`` to the option that does best on it."""
    heldout: dict[str, str] = Field(default_factory=dict)
    """Domain (a pack's name, ``base`` or a name of ``domains``) -> a separate file of prompts
    on which the options' losses are measured. Default: the last ``choose_samples`` prompts of
    the domain's own file (at most a quarter of it), held back from fitting the classifier. A
    ``{query, doc}`` .jsonl is a retrieval set: the option with the highest MRR serves the
    domain (any model; the only measure an encoder base has)."""
    mixes: list[list[str]] | None = None
    """Weighted mixes of packs the router may choose (each a list of packs, switched in
    together: θ + Σ wᵢ Δ̂ᵢ with the fuse's weights). Default: one mix of all the packs when
    there are two or more; ``[]``: none."""
    mix_strategy: str = "sum"
    """How a mix fuses its packs: ``sum`` (task arithmetic with the fuse's weights, switched in
    pack by pack at no storage cost) or another static strategy (``ties``, ``dare``, ...), whose
    fused delta the bundle stores once per mix (``mixes/x+y.safetensors``, float32)."""
    mix_options: dict[str, Any] = Field(default_factory=dict)
    """That strategy's options, as a fuse of it takes them (``{ density = 0.5 }``)."""
    select: Literal["loss", "domain"] = "loss"
    """``loss``: each domain goes to the option (no pack, a pack, a mix) with the lowest loss
    on its held-out prompts, measured in the build (causal LMs; on an encoder only domains with
    retrieval held-out data are measured, the others keep ``domain``'s option). ``domain``:
    each pack's domain to its pack, other domains to no pack."""
    choose_samples: int = Field(default=64, gt=0)
    """Held-out prompts per domain on which the options' losses are measured."""
    loss_len: int = Field(default=128, gt=1)
    """Tokens of a held-out prompt the loss is measured on."""
    samples: int = Field(default=256, gt=0)
    """Prompts per class read from each file (the first ones)."""
    seq_len: int = Field(default=64, gt=0)
    """Tokens of a prompt the router looks at."""
    field: str = "text"
    """For .jsonl prompt files: the field holding the text."""


class RoutedStrategy:
    name: ClassVar[str] = "routed"
    version: ClassVar[int] = 2
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
