"""Fusion strategies by name. Add one: a module with a class like ``SumStrategy``, a line here."""

from __future__ import annotations

from typing import Any

from graftbuild.fusion.arcee_fusion import ArceeFusionStrategy
from graftbuild.fusion.base import Strategy
from graftbuild.fusion.breadcrumbs import BreadcrumbsStrategy
from graftbuild.fusion.breadcrumbs_ties import BreadcrumbsTiesStrategy
from graftbuild.fusion.dare import DareStrategy
from graftbuild.fusion.dare_linear import DareLinearStrategy
from graftbuild.fusion.dare_ties import DareTiesStrategy
from graftbuild.fusion.della import DellaStrategy
from graftbuild.fusion.della_linear import DellaLinearStrategy
from graftbuild.fusion.karcher import KarcherStrategy
from graftbuild.fusion.linear import LinearStrategy
from graftbuild.fusion.model_stock import ModelStockStrategy
from graftbuild.fusion.multislerp import MultislerpStrategy
from graftbuild.fusion.nearswap import NearswapStrategy
from graftbuild.fusion.nuslerp import NuslerpStrategy
from graftbuild.fusion.passthrough import PassthroughStrategy
from graftbuild.fusion.routed import RoutedStrategy
from graftbuild.fusion.sce import SceStrategy
from graftbuild.fusion.slerp import SlerpStrategy
from graftbuild.fusion.sum import SumStrategy
from graftbuild.fusion.task_arithmetic import TaskArithmeticStrategy
from graftbuild.fusion.ties import TiesStrategy

STRATEGIES: dict[str, Strategy] = {
    s.name: s for s in (SumStrategy(), TiesStrategy(), DareStrategy(), RoutedStrategy())
}
# mergekit's methods under mergekit's names (docs/FUSION.md); ``ties`` above is one of them.
STRATEGIES |= {
    s.name: s
    for s in (
        LinearStrategy(),
        TaskArithmeticStrategy(),
        DareLinearStrategy(),
        DareTiesStrategy(),
        SlerpStrategy(),
        NuslerpStrategy(),
        MultislerpStrategy(),
        KarcherStrategy(),
        BreadcrumbsStrategy(),
        BreadcrumbsTiesStrategy(),
        DellaStrategy(),
        DellaLinearStrategy(),
        SceStrategy(),
        ModelStockStrategy(),
        NearswapStrategy(),
        ArceeFusionStrategy(),
        PassthroughStrategy(),
    )
}


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown fusion strategy {name!r}; known: {sorted(STRATEGIES)}") from None


def parse_strategy(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Validated options with defaults filled in (raises ValueError/ValidationError)."""
    return get_strategy(name).Params.model_validate(options).model_dump(mode="json")


def check_fuse_packs(
    name: str, packs: list[str] | None, pack_options: dict[str, dict[str, Any]]
) -> None:
    """A mergekit-named strategy's pack count (``packs`` None: counted per slice when fusing)
    and per-pack parameters (raises ValueError)."""
    from graftbuild.fusion.schedule import MergeParams, check_pack_options

    strategy = get_strategy(name)
    params = strategy.Params
    if not issubclass(params, MergeParams):
        if pack_options:
            raise ValueError(f"`pack_options` are for mergekit's methods, not {name!r}")
        return
    lo, hi = getattr(strategy, "min_packs", 1), getattr(strategy, "max_packs", None)
    if packs is not None and (len(packs) < lo or (hi is not None and len(packs) > hi)):
        want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo}-{hi}"
        raise ValueError(f"{name!r} takes {want} pack(s), got {len(packs)}: {packs}")
    for pack, opts in pack_options.items():
        check_pack_options(params, pack, opts)
