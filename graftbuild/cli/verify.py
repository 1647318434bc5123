"""``graftbuild verify [RECIPE] [TARGET...]``: rebuild everything, compare with the lockfile
(graftbuild/build/verify.py). Exit code 0 when everything matches, 1 when any node drifted, 2
without a lockfile."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.table import Table

from graftbuild.cli.common import (
    build_options,
    console,
    recipe_options,
    resolve_device,
    split_args,
)


@click.command()
@recipe_options
@build_options
@click.option(
    "--against",
    metavar="CACHE_OR_URL",
    help="Instead of rebuilding: compare this cache's outputs, key by key, with another "
    "machine's cache folder or a remote cache URL.",
)
def verify(
    args: tuple[str, ...],
    cache: Path | None,
    as_json: bool,
    device: str,
    jobs: int | None,
    against: str | None,
) -> None:
    """Rebuild every node into a temporary cache and compare it byte for byte with the lock
    (or, with --against, compare this cache with another machine's)."""
    from graftbuild.build.verify import verify_against, verify_build
    from graftbuild.progress import Reporter

    recipe_path, targets = split_args(args)
    reporter = Reporter(console(stderr=True, quiet=as_json))
    if against is not None:
        report_against(
            verify_against(recipe_path, cache, against, targets or None, reporter), against, as_json
        )
        return
    device = resolve_device(device, reporter)
    checks = verify_build(recipe_path, cache, device, jobs, targets or None, reporter)
    bad = [c for c in checks if not c.ok]
    if as_json:
        click.echo(json.dumps({"ok": not bad, "nodes": [c.to_json() for c in checks]}))
    else:
        table = Table("node", "lock", "rebuilt", "cached", "result", box=None, pad_edge=False)
        for c in checks:
            table.add_row(
                c.id,
                (c.lock or "-")[:12],
                (c.rebuilt or "-")[:12],
                (c.cached or "-")[:12],
                "[green]ok[/]" if c.ok else "[red]" + "; ".join(c.problems) + "[/]",
            )
        out = console()
        out.print(table)
        out.print(
            f"{len(checks) - len(bad)} of {len(checks)} node(s) reproduce the lock"
            + (f"; drift in: {', '.join(c.id for c in bad)}" if bad else "")
        )
    if bad:
        sys.exit(1)


def report_against(checks: list, other: str, as_json: bool) -> None:
    bad = [c for c in checks if not c.ok]
    if as_json:
        click.echo(json.dumps({"ok": not bad, "nodes": [c.to_json() for c in checks]}))
    else:
        table = Table("node", "here", "there", "result", box=None, pad_edge=False)
        for c in checks:
            close = f" (within {c.difference:.2g})" if c.difference is not None and c.ok else ""
            table.add_row(
                c.id,
                (c.here or "-")[:12],
                (c.there or "-")[:12],
                ("[green]ok[/]" + close) if c.ok else "[red]" + "; ".join(c.problems) + "[/]",
            )
        out = console()
        out.print(table)
        out.print(
            f"{len(checks) - len(bad)} of {len(checks)} node(s) agree with {other}"
            + (f"; disagree: {', '.join(c.id for c in bad)}" if bad else "")
        )
    if bad:
        sys.exit(1)
