"""``graftbuild fsck [RECIPE]``: re-read every cached object, and the recipe's materialised
outputs, checking each byte against the hashes it was stored under.

``make`` checks objects cheaply on every use (files whose stat is unchanged keep their recorded
hash); this command reads everything, so it also finds damage that left the stat untouched.
With ``--repair`` a corrupt object is removed (the next ``make`` rebuilds it) and a damaged output
is materialised again from its intact object. Exit code 1 while a problem remains.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
from rich.markup import escape

from graftbuild.commands.common import DEFAULT_RECIPE, console
from graftbuild.errors import UserError


@dataclass
class Problem:
    kind: str
    """"object", "output" or "action"."""
    path: str
    problem: str
    repaired: bool = False


@dataclass
class FsckReport:
    objects: int = 0
    outputs: int = 0
    bytes_read: int = 0
    leftovers: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def unrepaired(self) -> list[Problem]:
        return [p for p in self.problems if not p.repaired]


def run_fsck(store, graph=None, repair: bool = False) -> FsckReport:  # type: ignore[no-untyped-def]
    """Check (and with ``repair`` fix) ``store`` and, given a build graph, its outputs. The
    caller holds the store's lock."""
    from graftbuild.hashing import hash_file
    from graftbuild.integrity import check_copy, check_object, read_manifest
    from graftbuild.store import MARKER

    report = FsckReport()

    def full(path: Path) -> str:
        report.bytes_read += path.stat().st_size
        return hash_file(path)

    leftovers = list((store.root / "tmp").iterdir())
    report.leftovers = len(leftovers)
    if repair:
        store.clean_tmp()

    corrupt: set[str] = set()
    for obj in sorted((store.root / "objects").glob("*/*")):
        digest = obj.name
        report.objects += 1
        problem = check_object(obj, digest, full)
        if problem is None:
            for rel, (_, h) in (read_manifest(obj) or {}).items():
                store.stat_cache.remember(obj / rel, h)  # just read in full: the next make trusts
            continue
        corrupt.add(digest)
        report.problems.append(Problem("object", str(obj), problem, repaired=repair))
        if repair:
            store.discard(digest)

    for entry in sorted((store.root / "actions").glob("*/*.json")):
        try:
            ok = isinstance(json.loads(entry.read_text()).get("output"), str)
        except (ValueError, AttributeError, OSError):
            ok = False
        if not ok:
            report.problems.append(Problem("action", str(entry), "unreadable", repaired=repair))
            if repair:
                entry.unlink(missing_ok=True)

    for node in graph.order() if graph is not None else []:
        dest = node.output
        if dest is None or not (dest / MARKER).is_file():
            continue
        try:
            digest = json.loads((dest / MARKER).read_text())["object"]
            assert isinstance(digest, str)
        except (ValueError, KeyError, TypeError, AssertionError):
            report.problems.append(Problem("output", str(dest), f"damaged marker {MARKER}"))
            continue
        report.outputs += 1
        obj = store.object_path(digest)
        if digest in corrupt or not obj.is_dir():
            why = "its cached object is corrupt" if digest in corrupt else "its object is gone"
            report.problems.append(Problem("output", str(dest), f"{why}; run graftbuild make"))
            continue
        problem = check_copy(obj, dest, full)
        if problem is None:
            continue
        report.problems.append(Problem("output", str(dest), problem))
        if repair:
            store.materialize(digest, dest, node.id, reason=problem)
            report.problems[-1].repaired = True
    store.stat_cache.dirty = True
    store.stat_cache.save()
    return report


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
    from graftbuild.graph import build_graph
    from graftbuild.recipe import load_recipe
    from graftbuild.scheduler import cache_dir
    from graftbuild.store import Store

    graph = None
    if recipe is not None or Path(DEFAULT_RECIPE).is_file():
        loaded = load_recipe(recipe or Path(DEFAULT_RECIPE))
        graph = build_graph(loaded)
        cache = cache_dir(loaded, cache)
    elif cache is None:
        raise UserError(f"no recipe ({DEFAULT_RECIPE} not found here) and no --cache to check")
    if not (cache / "objects").is_dir():
        raise UserError(f"{cache}: not a graftbuild cache (no objects/ folder)")
    store = Store(cache)
    err = console(stderr=True)
    with store.lock(on_wait=lambda pid: err.print(f"waiting for graftbuild build (pid {pid})")):
        report = run_fsck(store, graph, repair)
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
