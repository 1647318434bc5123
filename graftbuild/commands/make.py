"""``graftbuild make [RECIPE] [TARGET...]``: build what is stale, reuse the rest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from graftbuild import noop
from graftbuild.commands.common import console, open_scheduler, recipe_options, split_args


@click.command()
@recipe_options
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Tensors processed in parallel inside a pack or fuse node (same bytes for any -j).",
)
@click.option("-q", "--quiet", is_flag=True, help="Only errors (and --json output).")
def make(
    args: tuple[str, ...],
    cache: Path | None,
    as_json: bool,
    device: str,
    jobs: int,
    quiet: bool,
) -> None:
    """Build the recipe's targets (default: every node), rebuilding only what is stale."""
    recipe_path, targets = split_args(args)
    sched = open_scheduler(recipe_path, cache, device, jobs, quiet)
    recipe_bytes = forget_last_build(sched, targets)
    result = sched.make(targets or None)
    record_build(sched, recipe_bytes, targets, result)
    print_summary(console(stderr=as_json, quiet=quiet), sched, result)
    if as_json:
        click.echo(json.dumps({"built": result.built, "reused": result.reused}))


def forget_last_build(sched: Any, targets: list[str]) -> bytes:
    """Void the no-op record before building; returns the recipe bytes this build uses."""
    recipe = sched.recipe.path
    recipe_bytes = recipe.read_bytes()
    noop.forget(sched.store.root, recipe, targets)
    return recipe_bytes


def record_build(sched: Any, recipe_bytes: bytes, targets: list[str], result: Any) -> None:
    """Write the record that lets the next no-op ``make``/``plan`` stop after a few stats."""
    nodes = [
        {
            "id": n.id,
            "kind": "input" if sched.graph.node(n.id).is_input else "step",
            "output": str(n.output) if n.output else None,
            "object": None
            if sched.graph.node(n.id).is_input or not n.output_hash
            else str(sched.store.object_path(n.output_hash)),
        }
        for n in result.nodes
    ]
    noop.save(
        sched.store.root,
        sched.recipe.path,
        recipe_bytes,
        targets,
        sched.store.stat_cache.seen,
        nodes,
    )


def print_summary(out: Console, sched: Any, result: Any) -> None:
    table = Table("node", "action", "output", box=None, pad_edge=False)
    styles = {"built": "yellow", "reused": "green", "restored": "cyan"}
    for n in result.nodes:
        table.add_row(n.id, f"[{styles.get(n.action, '')}]{n.action}[/]", str(n.output or ""))
    out.print(table)
    for n in result.nodes:
        if n.id.startswith("eval:") and n.output_hash:
            print_metrics(out, n.id, sched.store.object_path(n.output_hash) / "metrics.json")
    out.print(f"built {len(result.built)}, reused {len(result.reused)}")


def print_metrics(out: Console, node_id: str, path: Path) -> None:
    metrics: dict[str, dict[str, dict[str, float]]] = json.loads(path.read_text())
    models = list(metrics)
    datasets = sorted({d for m in metrics.values() for d in m})
    table = Table("held-out loss", *models, title=node_id, title_justify="left")
    for d in datasets:
        table.add_row(
            d, *(f"{metrics[m][d]['loss']:.3f}" if d in metrics[m] else "" for m in models)
        )
    out.print(table)
