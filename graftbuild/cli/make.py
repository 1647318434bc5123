"""``graftbuild make [RECIPE] [TARGET...]``: build what is stale, reuse the rest."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from graftbuild.build import noop
from graftbuild.build.runners import RUNNERS, make_runner
from graftbuild.cli.common import (
    build_options,
    console,
    open_engine,
    recipe_options,
    split_args,
)


@click.command()
@recipe_options
@build_options
@click.option("-q", "--quiet", is_flag=True, help="Only errors (and --json output).")
@click.option(
    "--locked",
    is_flag=True,
    help="Fail (exit 2) if any input differs from the lockfile, (exit 1) if a rebuilt node's "
    "bytes do; never rewrite the lockfile.",
)
@click.option("--no-pull", is_flag=True, help="Do not download from the remote cache.")
@click.option("--no-push", is_flag=True, help="Do not upload what is built to the remote cache.")
@click.option(
    "--executor",
    type=click.Choice(sorted(RUNNERS)),
    default="local",
    show_default=True,
    help="The runner that builds stale nodes (graftbuild/build/runners/).",
)
@click.option("--address", help="Ray cluster address (default: a local cluster on 127.0.0.1).")
@click.option(
    "--keep-going", is_flag=True, help="After a failure, build every node not below a failed one."
)
@click.option(
    "--fsync",
    is_flag=True,
    help="fsync every object before it enters the cache (also GRAFTBUILD_FSYNC=1); by default "
    "the kernel writes them back and objects are re-checked after a crash.",
)
def make(
    args: tuple[str, ...],
    cache: Path | None,
    as_json: bool,
    device: str,
    jobs: int,
    quiet: bool,
    locked: bool,
    no_pull: bool,
    no_push: bool,
    executor: str,
    address: str | None,
    keep_going: bool,
    fsync: bool,
) -> None:
    """Build the recipe's targets (default: every node), rebuilding only what is stale.

    Writes the lockfile RECIPE.lock; exits with 1 when a release gate fails.
    """
    from graftbuild.build.lockfile import lock_path
    from graftbuild.cache import durability
    from graftbuild.release.gates import evaluate

    # the mode holds for this command only (restored when click closes its context)
    click.get_current_context().with_resource(durability.using(durability.requested(fsync)))

    recipe_path, targets = split_args(args)
    engine = open_engine(recipe_path, cache, device, jobs, quiet, not no_pull, not no_push)
    runner = make_runner(executor, address=address)
    recipe_bytes = forget_last_build(engine, targets)
    result = engine.make(targets or None, runner, locked=locked, keep_going=keep_going)
    out = console(stderr=as_json, quiet=quiet)
    print_summary(out, engine, result)
    gates = evaluate(engine, result)
    print_gates(out, gates)
    if not locked:
        out.print(f"lockfile: {lock_path(engine.recipe.path)}")
    if as_json:
        click.echo(
            json.dumps(
                {
                    "built": result.built,
                    "reused": result.reused,
                    "pulled": result.ids("pulled"),
                    "gates": [g.to_json() for g in gates],
                }
            )
        )
    failed = [g for g in gates if not g.passed]
    if failed:
        click.echo(
            f"error: {len(failed)} release gate(s) failed: "
            + "; ".join(g.describe() for g in failed),
            err=True,
        )
        sys.exit(1)
    # only a build that passed its gates may be answered by the no-op fast path next time
    record_build(engine, recipe_bytes, targets, result, [g.to_json() for g in gates])


def print_gates(out: Console, gates: list[Any]) -> None:
    if not gates:
        return
    table = Table("release gate", "result", box=None, pad_edge=False)
    for g in gates:
        table.add_row(g.describe(), "[green]pass[/]" if g.passed else "[red]FAIL[/]")
    out.print(table)


def forget_last_build(engine: Any, targets: list[str]) -> bytes:
    """Void the no-op record before building; returns the recipe bytes this build uses."""
    recipe = engine.recipe.path
    recipe_bytes = recipe.read_bytes()
    noop.forget(engine.store.root, recipe, targets)
    return recipe_bytes


def record_build(
    engine: Any, recipe_bytes: bytes, targets: list[str], result: Any, gates: list[dict]
) -> None:
    """Write the record that lets the next no-op ``make``/``plan`` stop after a few stats.

    The lockfile is watched too: a deleted or edited lock sends the next make to the planner,
    which writes it again."""
    from graftbuild.build.lockfile import lock_path
    from graftbuild.cache.hashing import signature

    nodes = [
        {
            "id": n.id,
            "kind": "input" if engine.graph.node(n.id).is_input else "step",
            "output": str(n.output) if n.output else None,
            "object": None
            if engine.graph.node(n.id).is_input or not n.output_hash
            else str(engine.store.object_path(n.output_hash)),
        }
        for n in result.nodes
    ]
    # Inputs keep the signature they had when hashed (a change since must void the record).
    # Cached object files were verified on use, then hardlinked into outputs, which moves their
    # ctime: take their signature as it is now.
    objects = str(engine.store.root / "objects") + os.sep
    seen = {
        p: signature(p) if p.startswith(objects) else sig
        for p, sig in engine.store.stat_cache.seen.items()
    }
    lock = lock_path(engine.recipe.path)
    if lock.is_file():
        seen[str(lock)] = signature(lock)
    for n in result.nodes:  # a hub id's cached refs (refs/main): moving them voids the record
        node = engine.graph.node(n.id)
        if node.is_input and "hub" in node.config and node.path is not None:
            refs = node.path.parent.parent / "refs"
            for ref in sorted(refs.rglob("*")) if refs.is_dir() else []:
                seen[str(ref)] = signature(ref)
    noop.save(engine.store.root, engine.recipe.path, recipe_bytes, targets, seen, nodes, gates)


def print_summary(out: Console, engine: Any, result: Any) -> None:
    table = Table("node", "action", "output", box=None, pad_edge=False)
    styles = {"built": "yellow", "reused": "green", "restored": "cyan", "pulled": "blue"}
    for n in result.nodes:
        table.add_row(n.id, f"[{styles.get(n.action, '')}]{n.action}[/]", str(n.output or ""))
    out.print(table)
    for n in result.nodes:
        if n.id.startswith("eval:") and n.output_hash:
            path = engine.store.object_path(n.output_hash) / "metrics.json"
            print_metrics(out, n.id, path, engine.graph.node(n.id).config["models"])
    out.print(f"built {len(result.built)}, reused {len(result.reused)}")


def print_metrics(out: Console, node_id: str, path: Path, models: list[str]) -> None:
    """Held-out loss per dataset (rows) and model (columns, in the recipe's order)."""
    metrics: dict[str, dict[str, dict[str, float]]] = json.loads(path.read_text())
    datasets = sorted({d for m in metrics.values() for d in m})
    table = Table("dataset", *models, title=f"{node_id}: held-out loss", title_justify="left")
    for d in datasets:
        table.add_row(
            d, *(f"{metrics[m][d]['loss']:.3f}" if d in metrics[m] else "" for m in models)
        )
    out.print(table)
