"""``graftbuild plan [RECIPE] [TARGET...]``: fresh or stale, and why, without building."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from graftbuild.cli.common import console, open_engine, recipe_options, split_args


@click.command()
@recipe_options
def plan(args: tuple[str, ...], cache: Path | None, as_json: bool) -> None:
    """Show every node as fresh or stale, with the reasons, without building."""
    recipe_path, targets = split_args(args)
    engine = open_engine(recipe_path, cache, quiet=as_json)

    def waiting(pid: str) -> None:
        console(stderr=True).print(f"waiting for another graftbuild build (pid {pid})")

    with engine.store.lock(on_wait=waiting):
        nodes = engine.plan(targets or None)
        engine.store.stat_cache.save()
    if as_json:
        click.echo(json.dumps({"nodes": [n.to_json() for n in nodes]}))
        return
    table = Table("node", "state", "why", box=None, pad_edge=False)
    for n in nodes:
        style = "green" if n.state == "fresh" else "yellow"
        table.add_row(n.id, f"[{style}]{n.state}[/]", "; ".join(n.reasons))
    console().print(table)
