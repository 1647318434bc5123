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
    from graftbuild.steps.preflight import estimates

    est = estimates(engine.recipe, [engine.graph.node(n.id) for n in nodes])
    if as_json:
        doc = {"nodes": [n.to_json() for n in nodes]}
        stale = {n.id: vars(est[n.id]) for n in nodes if n.state != "fresh" and n.id in est}
        if stale:  # what building the stale nodes would cost (none: the no-op answer's shape)
            doc["estimates"] = stale
        click.echo(json.dumps(doc))
        return
    table = Table("node", "state", "peak mem", "writes", "time", "why", box=None, pad_edge=False)
    for n in nodes:
        style = "green" if n.state == "fresh" else "yellow"
        e = est.get(n.id)
        cost = ["", "", ""]
        if e is not None and n.state != "fresh" and e.peak:
            cost = [f"~{human(e.peak)}", f"~{human(e.written)}", _seconds(e.seconds)]
        table.add_row(n.id, f"[{style}]{n.state}[/]", *cost, "; ".join(n.reasons))
    console().print(table)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.0f} TB"


def _seconds(s: float | None) -> str:
    if s is None:
        return ""
    return f"~{s:.0f} s" if s < 120 else f"~{s / 60:.0f} min"
