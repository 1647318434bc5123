"""Fusion strategies by name. Add one: a module with a class like ``SumStrategy``, a line here."""

from __future__ import annotations

from typing import Any

from graftbuild.fusion.base import Strategy
from graftbuild.fusion.dare import DareStrategy
from graftbuild.fusion.routed import RoutedStrategy
from graftbuild.fusion.sum import SumStrategy
from graftbuild.fusion.ties import TiesStrategy

STRATEGIES: dict[str, Strategy] = {
    s.name: s for s in (SumStrategy(), TiesStrategy(), DareStrategy(), RoutedStrategy())
}


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown fusion strategy {name!r}; known: {sorted(STRATEGIES)}") from None


def parse_strategy(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Validated options with defaults filled in (raises ValueError/ValidationError)."""
    return get_strategy(name).Params.model_validate(options).model_dump(mode="json")
