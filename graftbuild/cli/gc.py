"""``graftbuild gc [RECIPE]``: delete cached objects that no recipe's lockfile references
(graftbuild/cache/gc.py)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from graftbuild.cli.common import console, recipe_options, split_args


@click.command()
@recipe_options
@click.option("-n", "--dry-run", is_flag=True, help="Report what would be removed; remove nothing.")
def gc(args: tuple[str, ...], cache: Path | None, as_json: bool, dry_run: bool) -> None:
    """Remove cached objects that no recipe's lockfile references, reporting the bytes freed."""
    from graftbuild.build import lockfile
    from graftbuild.build.engine import cache_dir
    from graftbuild.cache.gc import collect
    from graftbuild.cache.store import Store
    from graftbuild.errors import UserError
    from graftbuild.recipe import load_recipe
    from graftbuild.release.card import human_bytes

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

    def pinned_by(lock: Path) -> set[str] | None:
        doc = lockfile.load(lock)
        return None if doc is None else lockfile.referenced_objects(doc)

    report = collect(Store(root), extra, pinned_by, dry_run)
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
