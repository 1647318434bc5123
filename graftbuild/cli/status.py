"""``graftbuild status [RECIPE]``: what is built, how big it is, whether it matches the lock, and
how much the cache holds."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from graftbuild.cli.common import console, open_engine, recipe_options, split_args


def folder_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def cache_usage(root: Path) -> dict[str, Any]:
    objects = [p for d in sorted((root / "objects").glob("*")) for p in sorted(d.iterdir())]
    actions = sum(1 for _ in (root / "actions").glob("*/*.json"))
    return {
        "path": str(root),
        "objects": len(objects),
        "object_bytes": sum(folder_bytes(p) for p in objects),
        "actions": actions,
        "tmp_bytes": folder_bytes(root / "tmp"),
    }


@click.command()
@recipe_options
def status(args: tuple[str, ...], cache: Path | None, as_json: bool) -> None:
    """Each node: built or stale, its object's size, whether it matches the lockfile; cache use."""
    from graftbuild.build import lockfile
    from graftbuild.cache import roots
    from graftbuild.release.card import human_bytes

    recipe_path, targets = split_args(args)
    engine = open_engine(recipe_path, cache, quiet=as_json)
    with engine.store.lock():
        nodes = engine.plan(targets or None)
        engine.store.stat_cache.save()
    assert engine.recipe.path is not None
    lock = lockfile.load(lockfile.lock_path(engine.recipe.path)) or {}
    locked = lock.get("nodes", {})
    rows = []
    for n in nodes:
        node = engine.graph.node(n.id)
        size = None
        if n.output_hash and not node.is_input:
            size = folder_bytes(engine.store.object_path(n.output_hash))
        elif n.output_hash and node.path is not None:
            size = folder_bytes(node.path)
        entry = locked.get(n.id)
        match = None if entry is None or n.output_hash is None else entry["output"] == n.output_hash
        rows.append(
            {
                "id": n.id,
                "state": "built" if n.state == "fresh" else "stale",
                "reasons": n.reasons,
                "output_hash": n.output_hash,
                "bytes": size,
                "matches_lock": match,
                "output": str(node.output or node.path or ""),
            }
        )
    usage = cache_usage(engine.store.root) | {
        "registered_locks": len(roots.registered(engine.store))
    }
    if as_json:
        click.echo(json.dumps({"nodes": rows, "cache": usage}))
        return
    table = Table("node", "state", "size", "lock", "output", box=None, pad_edge=False)
    for r in rows:
        mark = {None: "-", True: "[green]=[/]", False: "[yellow]differs[/]"}[r["matches_lock"]]
        style = "green" if r["state"] == "built" else "yellow"
        table.add_row(
            r["id"],
            f"[{style}]{r['state']}[/]",
            human_bytes(r["bytes"]) if r["bytes"] is not None else "-",
            mark,
            r["output"],
        )
    out = console()
    out.print(table)
    out.print(
        f"cache {usage['path']}: {usage['objects']} objects, {human_bytes(usage['object_bytes'])}, "
        f"{usage['actions']} actions, {human_bytes(usage['tmp_bytes'])} in tmp/, "
        f"{usage['registered_locks']} lockfile(s) registered"
    )
