"""``graftbuild gc [RECIPE]``: delete cached objects that no recipe's lockfile references.

The roots are the objects named by every lockfile that a build registered in this cache
(``locks.json``, written by ``make``) and by the given recipe's lockfile. A registered lockfile
that no longer exists is dropped from the registry. Action-cache entries that point at a removed
object and leftovers in ``tmp/`` go too. The whole run holds the cache's build lock, so no build
is half way through. Reports the bytes freed: the objects' size, and how much of it stays on
disk because output folders hard-link the same files.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from graftbuild.commands.common import console, recipe_options, split_args


@dataclass
class GcReport:
    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    bytes: int = 0
    """Apparent size of the removed objects."""
    bytes_on_disk: int = 0
    """Of which the disk actually gets back (files with no hard link outside them)."""
    actions_removed: int = 0
    tmp_bytes: int = 0
    locks: list[str] = field(default_factory=list)
    dropped_locks: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def collect(store: Any, extra_locks: list[Path], dry_run: bool) -> GcReport:
    from graftbuild import lockfile
    from graftbuild.errors import UserError

    report = GcReport()
    with store.lock():
        registry = lockfile.registered(store)
        candidates = {str(p.resolve()) for p in extra_locks} | set(registry)
        roots: set[str] = set()
        for lock in sorted(candidates):
            try:
                doc = lockfile.load(Path(lock))
            except UserError as e:
                raise UserError(f"gc: refusing to collect, cannot read a lockfile: {e}") from None
            if doc is None:
                report.dropped_locks.append(lock)
                continue
            report.locks.append(lock)
            roots |= lockfile.referenced_objects(doc)
        objects = sorted(
            p for d in (store.root / "objects").glob("*") if d.is_dir() for p in d.iterdir()
        )
        garbage = [p for p in objects if p.name not in roots]
        report.kept = sorted(p.name for p in objects if p.name in roots)
        report.removed = [p.name for p in garbage]
        links: dict[tuple[int, int], list[int]] = {}
        for obj in garbage:
            for dirpath, _, files in os.walk(obj):
                for f in files:
                    st = os.lstat(os.path.join(dirpath, f))
                    report.bytes += st.st_size
                    seen = links.setdefault((st.st_dev, st.st_ino), [0, st.st_nlink, st.st_size])
                    seen[0] += 1
        report.bytes_on_disk = sum(size for n, nlink, size in links.values() if n >= nlink)
        tmp = store.root / "tmp"
        leftovers = sorted(tmp.iterdir()) if tmp.is_dir() else []
        for p in leftovers:
            report.tmp_bytes += sum(
                os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(p) for f in fs
            )
        removed = set(report.removed)
        stale_actions = []
        for a in sorted((store.root / "actions").glob("*/*.json")):
            try:
                out = json.loads(a.read_text()).get("output")
            except (ValueError, AttributeError, OSError):
                out = None
            if out in removed or not isinstance(out, str) or not store.has_object(out):
                stale_actions.append(a)
        report.actions_removed = len(stale_actions)
        if dry_run:
            return report
        for a in stale_actions:  # actions first: never an action pointing at a missing object
            a.unlink(missing_ok=True)
        for obj in garbage:
            shutil.rmtree(obj)
        for p in leftovers:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        for lock in report.dropped_locks:
            registry.pop(lock, None)
        if report.dropped_locks:
            path = store.root / lockfile.REGISTRY
            path.write_text(json.dumps({"locks": registry}, indent=1, sort_keys=True))
    return report


@click.command()
@recipe_options
@click.option("-n", "--dry-run", is_flag=True, help="Report what would be removed; remove nothing.")
def gc(args: tuple[str, ...], cache: Path | None, as_json: bool, dry_run: bool) -> None:
    """Remove cached objects that no recipe's lockfile references, reporting the bytes freed."""
    from graftbuild import lockfile
    from graftbuild.card import human_bytes
    from graftbuild.errors import UserError
    from graftbuild.recipe import load_recipe
    from graftbuild.scheduler import cache_dir
    from graftbuild.store import Store

    recipe_path, _ = split_args(args)
    extra: list[Path] = []
    if recipe_path.is_file():
        recipe = load_recipe(recipe_path)
        assert recipe.path is not None
        root = cache_dir(recipe, cache)
        extra.append(lockfile.lock_path(recipe.path))
    elif cache is not None:
        root = cache
    else:
        raise UserError(f"gc: no recipe {recipe_path} and no --cache: which cache to collect?")
    if not (root / "objects").is_dir():
        raise UserError(f"gc: {root} is not a graftbuild cache (no objects/ folder)")
    report = collect(Store(root), extra, dry_run)
    if as_json:
        click.echo(json.dumps(report.to_json() | {"dry_run": dry_run}))
        return
    verb = "would remove" if dry_run else "removed"
    out = console()
    for lock in report.dropped_locks:
        out.print(f"lockfile gone, no longer a root: {lock}")
    out.print(
        f"{verb} {len(report.removed)} object(s), {human_bytes(report.bytes)} "
        f"({human_bytes(report.bytes_on_disk)} on disk; the rest is hard-linked from output "
        f"folders), {report.actions_removed} action entr(ies), "
        f"{human_bytes(report.tmp_bytes)} of tmp/ leftovers; kept {len(report.kept)} object(s) "
        f"referenced by {len(report.locks)} lockfile(s)"
    )
