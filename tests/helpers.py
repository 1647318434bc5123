"""Small helpers shared by tests: build a recipe in-process, read weights."""

from __future__ import annotations

from pathlib import Path

from graftbuild.build.engine import Engine, MakeResult, NodeResult, cache_dir
from graftbuild.cache.store import Store
from graftbuild.recipe import load_recipe


def engine(recipe: Path, cache: Path | None = None) -> Engine:
    r = load_recipe(recipe)
    return Engine(r, Store(cache_dir(r, cache)))


def make(recipe: Path, targets: list[str] | None = None, cache: Path | None = None) -> MakeResult:
    return engine(recipe, cache).make(targets)


def plan(recipe: Path, cache: Path | None = None) -> dict[str, NodeResult]:
    return {n.id: n for n in engine(recipe, cache).plan()}


def load_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(str(f))
    return out
