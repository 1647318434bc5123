"""``graftbuild fsck [RECIPE]``: re-read every cached object and the recipe's materialised
outputs (graftbuild/cache/fsck.py). Exit code 1 while a problem remains."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click
from rich.markup import escape

from graftbuild.cli.common import DEFAULT_RECIPE, console
from graftbuild.errors import UserError


@click.command()
@click.argument("recipe", required=False, type=click.Path(path_type=Path))
@click.option(
    "--cache", type=click.Path(path_type=Path), help="Cache folder (overrides the recipe)."
)
@click.option(
    "--repair", is_flag=True, help="Remove corrupt objects; re-materialise damaged outputs."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
def fsck(recipe: Path | None, cache: Path | None, repair: bool, as_json: bool) -> None:
    """Re-read every cached object and materialised output, checking them against their hashes."""
    from graftbuild.build.engine import cache_dir
    from graftbuild.build.graph import build_graph
    from graftbuild.cache.fsck import run_fsck
    from graftbuild.cache.store import Store
    from graftbuild.recipe import load_recipe

    outputs = None
    if recipe is not None or Path(DEFAULT_RECIPE).is_file():
        loaded = load_recipe(recipe or Path(DEFAULT_RECIPE))
        outputs = [(n.id, n.output) for n in build_graph(loaded).order() if n.output is not None]
        cache = cache_dir(loaded, cache)
    elif cache is None:
        raise UserError(f"no recipe ({DEFAULT_RECIPE} not found here) and no --cache to check")
    if not (cache / "objects").is_dir():
        raise UserError(f"{cache}: not a graftbuild cache (no objects/ folder)")
    store = Store(cache)
    err = console(stderr=True)
    with store.lock(on_wait=lambda pid: err.print(f"waiting for graftbuild build (pid {pid})")):
        report = run_fsck(store, outputs, repair)
    if recipe is not None or Path(DEFAULT_RECIPE).is_file():
        from graftbuild.build import lockfile
        from graftbuild.cache.fsck import Problem

        lock = lockfile.lock_path(loaded.path)  # type: ignore[arg-type]
        try:
            lockfile.load(lock)
        except UserError as e:  # make writes a new one; a user's file is not deleted here
            report.problems.append(Problem("state", str(lock), f"{e}; run graftbuild make"))
    if as_json:
        click.echo(json.dumps(asdict(report) | {"ok": not report.unrepaired}))
    else:
        out = console()
        for p in report.problems:
            fixed = " [green](repaired)[/]" if p.repaired else ""
            out.print(
                f"[red]{p.kind}[/] {escape(p.path)}: {escape(p.problem)}{fixed}", soft_wrap=True
            )
        out.print(
            f"checked {report.objects} objects and {report.outputs} outputs "
            f"({report.bytes_read / 2**20:.1f} MiB read): {len(report.problems)} problems"
            + (f", {len(report.problems) - len(report.unrepaired)} repaired" if repair else "")
            + (
                f"; {report.leftovers} leftovers of interrupted builds in tmp/"
                * (report.leftovers > 0)
            )
        )
    if report.unrepaired:
        raise SystemExit(1)
