"""Command line: ``graftbuild make``, ``graftbuild plan``.

User errors exit with code 2, build failures with 1, each as one line on stderr; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from graftbuild import __version__
from graftbuild.errors import GraftbuildError

DEFAULT_RECIPE = "graftbuild.toml"


class _Group(click.Group):
    """Turns our errors into one line and an exit code (a traceback only with --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GraftbuildError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted; nothing half-written was kept", err=True)
            sys.exit(130)
        except Exception as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: internal error: {type(e).__name__}: {e} (rerun with --debug)", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(__version__, prog_name="graftbuild")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """graftbuild: a declarative, incremental build system for LLM weights."""
    ctx.obj = {"debug": debug}


def _split_args(args: tuple[str, ...]) -> tuple[Path, list[str]]:
    """``[RECIPE] [TARGET...]``: the first argument is the recipe if it looks like one."""
    if args and (args[0].endswith(".toml") or Path(args[0]).is_file()):
        return Path(args[0]), list(args[1:])
    return Path(DEFAULT_RECIPE), list(args)


def _scheduler(recipe_path: Path, cache: Path | None, device: str, jobs: int | None, quiet: bool):  # noqa: ANN202
    from graftbuild.progress import Reporter
    from graftbuild.recipe import load_recipe
    from graftbuild.scheduler import Scheduler, cache_dir
    from graftbuild.steps.base import BuildSettings
    from graftbuild.store import Store

    recipe = load_recipe(recipe_path)
    reporter = Reporter(Console(stderr=True, quiet=quiet, emoji=False, highlight=False))
    device = _resolve_device(device, reporter)
    store = Store(cache_dir(recipe, cache))
    return Scheduler(recipe, store, BuildSettings(device=device, threads=jobs), reporter)


def _resolve_device(device: str, reporter: Any) -> str:
    if device == "cpu":
        return device
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        reporter.log("[yellow]warning:[/] --device cuda requested but no CUDA device is available; using the CPU")
        return "cpu"
    return device


_common = [
    click.argument("args", nargs=-1),
    click.option("--cache", type=click.Path(path_type=Path), help="Cache folder (overrides the recipe)."),
    click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout."),
]


def common(f: Any) -> Any:
    for deco in reversed(_common):
        f = deco(f)
    return f


@main.command()
@common
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("-j", "--jobs", type=click.IntRange(min=1), help="CPU threads for tensor work.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors (and --json output).")
def make(args: tuple[str, ...], cache: Path | None, as_json: bool, device: str, jobs: int | None, quiet: bool) -> None:
    """Build the recipe's targets (default: every node), rebuilding only what is stale."""
    recipe_path, targets = _split_args(args)
    sched = _scheduler(recipe_path, cache, device, jobs, quiet)
    result = sched.make(targets or None)
    console = Console(stderr=as_json, quiet=quiet, emoji=False, highlight=False)
    _print_summary(console, sched, result)
    if as_json:
        click.echo(json.dumps({"built": result.built, "reused": result.reused}))


@main.command()
@common
def plan(args: tuple[str, ...], cache: Path | None, as_json: bool) -> None:
    """Show every node as fresh or stale, with the reasons, without building."""
    recipe_path, targets = _split_args(args)
    sched = _scheduler(recipe_path, cache, "cpu", None, quiet=as_json)
    with sched.store.lock():
        nodes = sched.plan(targets or None)
        sched.store.stat_cache.save()
    if as_json:
        click.echo(json.dumps({"nodes": [n.to_json() for n in nodes]}))
        return
    table = Table("node", "state", "why", box=None, pad_edge=False)
    for n in nodes:
        style = "green" if n.state == "fresh" else "yellow"
        table.add_row(n.id, f"[{style}]{n.state}[/]", "; ".join(n.reasons))
    Console(emoji=False, highlight=False).print(table)


def _print_summary(console: Console, sched: Any, result: Any) -> None:
    table = Table("node", "action", "output", box=None, pad_edge=False)
    styles = {"built": "yellow", "reused": "green", "restored": "cyan"}
    for n in result.nodes:
        table.add_row(n.id, f"[{styles.get(n.action, '')}]{n.action}[/]", str(n.output or ""))
    console.print(table)
    for n in result.nodes:
        if n.id.startswith("eval:") and n.output_hash:
            _print_metrics(console, n.id, sched.store.object_path(n.output_hash) / "metrics.json")
    console.print(f"built {len(result.built)}, reused {len(result.reused)}")


def _print_metrics(console: Console, node_id: str, path: Path) -> None:
    metrics: dict[str, dict[str, dict[str, float]]] = json.loads(path.read_text())
    models = list(metrics)
    datasets = sorted({d for m in metrics.values() for d in m})
    table = Table("held-out loss", *models, title=node_id, title_justify="left")
    for d in datasets:
        row = [f"{metrics[m][d]['loss']:.3f}" if d in metrics[m] else "" for m in models]
        table.add_row(d, *row)
    console.print(table)
