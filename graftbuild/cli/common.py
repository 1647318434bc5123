"""What the commands share: recipe/target arguments, cache option, opening an engine."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console

if TYPE_CHECKING:
    from graftbuild.build.engine import Engine

from graftbuild.cli.args import DEFAULT_RECIPE, split_args

__all__ = ["DEFAULT_RECIPE", "console", "open_engine", "recipe_options", "split_args"]


def console(stderr: bool = False, quiet: bool = False) -> Console:
    return Console(stderr=stderr, quiet=quiet, emoji=False, highlight=False)


def open_engine(
    recipe_path: Path,
    cache: Path | None,
    device: str = "cpu",
    jobs: int = 1,
    quiet: bool = False,
    pull: bool = True,
    push: bool = True,
    strict_remote: bool = False,
    events: Any = None,
) -> Engine:
    from graftbuild.build.engine import Engine, cache_dir
    from graftbuild.build.graph import build_graph
    from graftbuild.build.pathcheck import check_overlaps
    from graftbuild.cache.remote import Remote
    from graftbuild.cache.store import Store
    from graftbuild.progress import Reporter
    from graftbuild.recipe import load_recipe
    from graftbuild.steps.base import BuildSettings

    recipe = load_recipe(recipe_path)
    reporter = Reporter(console(stderr=True, quiet=quiet), events=events)
    device = resolve_device(device, reporter)
    root = cache_dir(recipe, cache)
    check_overlaps(build_graph(recipe), root)  # before the cache folder is created anywhere
    store = Store(root)
    remote = None
    if recipe.project.remote is not None:
        remote = Remote(
            recipe.project.remote, reporter.log, strict=strict_remote, pull=pull, push=push
        )
    settings = BuildSettings(device=device, jobs=jobs)
    return Engine(recipe, store, settings, reporter, remote)


def resolve_device(device: str, reporter: Any) -> str:
    """``cuda`` when there is none falls back to the CPU, saying so."""
    from graftbuild.weights.placement import resolve_device as resolve

    return resolve(device, reporter.log)


def build_options(f: Any) -> Any:
    """``--device`` and ``-j/--jobs``: how a build runs (never what it produces)."""
    f = click.option(
        "-j",
        "--jobs",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Tensors processed in parallel inside a pack or fuse node (same bytes for any -j).",
    )(f)
    return click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")(f)


def recipe_options(f: Any) -> Any:
    """``[RECIPE] [TARGET...]``, ``--cache``, ``--json``."""
    f = click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")(
        f
    )
    f = click.option(
        "--cache", type=click.Path(path_type=Path), help="Cache folder (overrides the recipe)."
    )(f)
    return click.argument("args", nargs=-1)(f)
