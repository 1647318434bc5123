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
from graftbuild.errors import BuildError, describe_os_error


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
@click.option(
    "--events",
    metavar="FILE|-",
    help="Write the build's events as JSON lines (node started, progress, finished, failed, "
    "pulled, pushed; a summary last) to FILE, or to stdout with -.",
)
@click.option(
    "--progress-interval",
    type=click.FloatRange(min=0),
    help="Captured output (not a terminal): seconds between two progress lines of a long step "
    "(default 10, or GRAFTBUILD_PROGRESS_INTERVAL).",
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
    events: str | None,
    progress_interval: float | None,
) -> None:
    """Build the recipe's targets (default: every node), rebuilding only what is stale.

    Writes the lockfile RECIPE.lock; exits with 1 when a release gate fails. Ends with a summary
    of every node (action, wall time, bytes written, peak memory); with --json, the same as one
    JSON object, the last line of stdout, on success and on failure alike.
    """
    from graftbuild.build.lockfile import lock_path
    from graftbuild.cache import durability
    from graftbuild.progress import EventSink
    from graftbuild.release.gates import evaluate

    ctx = click.get_current_context()
    # the mode holds for this command only (restored when click closes its context)
    ctx.with_resource(durability.using(durability.requested(fsync)))
    sink = EventSink.open(events) if events else None
    if sink is not None:
        ctx.call_on_close(sink.close)
    # stdout is the machine's when --json or --events - write to it: people get stderr
    out = console(stderr=as_json or events == "-", quiet=quiet)
    if not out.is_terminal:
        out.width = max(out.width, 160)  # captured: whole paths, one row per line
    engine: Any = None
    try:
        recipe_path, targets = split_args(args)
        engine = open_engine(
            recipe_path, cache, device, jobs, quiet, not no_pull, not no_push, events=sink
        )
        if progress_interval is not None:
            engine.reporter.interval = progress_interval
        runner = make_runner(executor, address=address)
        recipe_bytes = forget_last_build(engine, targets)
        result = engine.make(targets or None, runner, locked=locked, keep_going=keep_going)
    except Exception as e:
        partial = getattr(e, "result", None)
        if partial is not None and engine is not None:
            print_summary(out, engine, partial)
        report_end(as_json, sink, partial, [], e)
        raise
    print_summary(out, engine, result)
    gates = evaluate(engine, result)
    print_gates(out, gates)
    if not locked:
        out.print(f"lockfile: {lock_path(engine.recipe.path)}")
    failed = [g for g in gates if not g.passed]
    if failed:
        message = f"{len(failed)} release gate(s) failed: " + "; ".join(
            g.describe() for g in failed
        )
        gate_error = GateFailure(message)
        gate_error.node = f"eval:{failed[0].eval}"
        report_end(as_json, sink, result, gates, gate_error)
        click.echo(f"error: {message}", err=True)
        sys.exit(1)
    report_end(as_json, sink, result, gates, None)
    # only a build that passed its gates may be answered by the no-op fast path next time
    record_build(engine, recipe_bytes, targets, result, [g.to_json() for g in gates])


class GateFailure(BuildError):
    """A release gate failed (the build itself succeeded)."""


def final_json(result: Any, gates: list[Any], error: BaseException | None) -> dict[str, Any]:
    """The one object ``--json`` ends with: what each node did and cost, the gates, and, on a
    failure, the node, exit code and message."""
    nodes = [] if result is None else [n.cost() for n in result.nodes]
    out: dict[str, Any] = {
        "ok": error is None,
        "built": [] if result is None else result.built,
        "reused": [] if result is None else result.reused,
        "pulled": [] if result is None else result.ids("pulled"),
        "failed": [] if result is None else result.failed,
        "gates": [g.to_json() for g in gates],
        "nodes": nodes,
        "totals": None if result is None else result.totals(),
    }
    if error is not None:
        message = str(error)
        if isinstance(error, OSError):
            message = describe_os_error(error)
        out["error"] = {
            "node": getattr(error, "node", None),
            "exit_code": getattr(error, "exit_code", 1),
            "message": message,
            "type": type(error).__name__,
        }
    return out


def report_end(
    as_json: bool, sink: Any, result: Any, gates: list[Any], error: BaseException | None
) -> None:
    summary = final_json(result, gates, error)
    if sink is not None:
        sink.write({"event": "summary", **summary})
    if as_json:
        click.echo(json.dumps(summary))


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
    links = engine.recipe._links
    noop.save(
        engine.store.root, engine.recipe.path, recipe_bytes, targets, seen, nodes, gates, links
    )


def print_summary(out: Console, engine: Any, result: Any) -> None:
    """Every node: what was done, its wall time, bytes written, peak RSS (and GPU memory when a
    node ran on one); then the totals."""
    from graftbuild.progress import human_bytes, seconds

    rows = [n.cost() for n in result.nodes]
    gpu = any(r["peak_gpu"] is not None for r in rows)
    heads = ["node", "action", "time", "written", "peak RSS", *(["peak GPU"] if gpu else [])]
    table = Table(*heads, "output", box=None, pad_edge=False)
    styles = {
        "built": "yellow",
        "reused": "green",
        "restored": "cyan",
        "pulled": "blue",
        "failed": "red",
        "skipped": "red",
    }

    def size(n: int | None) -> str:
        return "-" if not n else human_bytes(n)

    for r in rows:
        table.add_row(
            r["id"],
            f"[{styles.get(r['action'], '')}]{r['action']}[/]",
            "-" if r["seconds"] is None else seconds(r["seconds"]),
            size(r["bytes"]),
            size(r["peak_rss"]),
            *([size(r["peak_gpu"])] if gpu else []),
            r["output"] or "",
        )
    totals = result.totals()
    table.add_row(
        "[bold]total[/]",
        f"{len(rows)} nodes",
        seconds(totals["seconds"]),
        size(totals["bytes"]),
        size(totals["peak_rss"]),
        *([size(totals["peak_gpu"])] if gpu else []),
        "",
    )
    out.print(table)
    for n in result.nodes:
        if n.id.startswith("eval:") and n.output_hash:
            path = engine.store.object_path(n.output_hash) / "metrics.json"
            print_metrics(out, n.id, path, engine.graph.node(n.id).config["models"])
    counts = totals["actions"]
    extra = "".join(
        f", {k} {counts[k]}" for k in ("pulled", "restored", "failed", "skipped") if counts.get(k)
    )
    out.print(
        f"built {len(result.built)}, reused {len(result.reused)}{extra}; "
        f"{human_bytes(totals['bytes'])} written"
    )


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
