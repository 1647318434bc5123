"""Small helpers shared by tests: build a recipe in-process, read weights."""

from __future__ import annotations

from pathlib import Path

from graftbuild.recipe import load_recipe
from graftbuild.scheduler import MakeResult, NodeResult, Scheduler, cache_dir
from graftbuild.store import Store


def scheduler(recipe: Path, cache: Path | None = None) -> Scheduler:
    r = load_recipe(recipe)
    return Scheduler(r, Store(cache_dir(r, cache)))


def make(recipe: Path, targets: list[str] | None = None, cache: Path | None = None) -> MakeResult:
    return scheduler(recipe, cache).make(targets)


def plan(recipe: Path, cache: Path | None = None) -> dict[str, NodeResult]:
    return {n.id: n for n in scheduler(recipe, cache).plan()}


def load_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(str(f))
    return out
