"""``graftbuild verify [RECIPE] [TARGET...]``: rebuild everything, compare with the lockfile.

Every node is rebuilt into a temporary cache (``<cache>/verify/``, removed afterwards; nothing is
materialised and the lockfile is not touched), and its bytes are compared with the lockfile's
output hash, file by file (xxh3-128). The objects the lock names in the real cache are re-read
too, so a cached artifact that was altered after it was built is reported as well. Exit code 0
when everything matches, 1 when any node drifted, 2 without a lockfile.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from graftbuild.commands.common import (
    build_options,
    console,
    recipe_options,
    resolve_device,
    split_args,
)


@dataclass
class NodeCheck:
    id: str
    lock: str | None
    rebuilt: str | None
    cached: str | None = None
    """The hash of the cached object the lock names, re-read now (None: not in the cache)."""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "lock": self.lock,
            "rebuilt": self.rebuilt,
            "cached": self.cached,
            "ok": self.ok,
            "problems": self.problems,
        }


def _file_diff(now: dict[str, str], lock: dict[str, str]) -> str:
    changed = sorted(k for k in set(now) | set(lock) if now.get(k) != lock.get(k))
    return ", ".join(changed[:5]) + (" …" if len(changed) > 5 else "")


def verify_build(
    recipe_path: Path,
    cache: Path | None,
    device: str = "cpu",
    jobs: int | None = None,
    targets: list[str] | None = None,
    quiet: bool = False,
) -> list[NodeCheck]:
    from graftbuild import lockfile
    from graftbuild.errors import UserError
    from graftbuild.hashing import tree_hash_uncached
    from graftbuild.progress import Reporter
    from graftbuild.recipe import load_recipe
    from graftbuild.scheduler import Scheduler, cache_dir
    from graftbuild.steps.base import BuildSettings
    from graftbuild.store import Store

    recipe = load_recipe(recipe_path)
    assert recipe.path is not None
    lock_file = lockfile.lock_path(recipe.path)
    lock = lockfile.load(lock_file)
    if lock is None:
        raise UserError(f"no lockfile {lock_file}; run `graftbuild make` first")
    entries: dict[str, Any] = lock.get("nodes", {})
    reporter = Reporter(console(stderr=True, quiet=quiet))
    main = Store(cache_dir(recipe, cache))
    scratch_root = main.root / "verify"
    scratch_root.mkdir(exist_ok=True)
    checks: list[NodeCheck] = []
    with tempfile.TemporaryDirectory(prefix="run.", dir=scratch_root) as tmp:
        scratch = Store(Path(tmp))
        settings = BuildSettings(device=resolve_device(device, reporter), jobs=jobs or 1)
        sched = Scheduler(recipe, scratch, settings, reporter)
        sched.write_lock = False
        for nid in sched.graph.graph:
            sched.graph.node(nid).output = None  # rebuild only; never touch the user's outputs
        result = sched.make(targets)
        for n in result.nodes:
            entry = entries.get(n.id)
            check = NodeCheck(n.id, entry.get("output") if entry else None, n.output_hash)
            checks.append(check)
            if entry is None:
                check.problems.append("not in the lock")
                continue
            lock_files: dict[str, str] = entry.get("output_files", {})
            if n.output_hash != check.lock:
                what = "input differs from the lock" if entry["step"] == "input" else "rebuilt"
                if entry["step"] == "input":
                    now = sched.store.stat_cache.tree(sched.graph.node(n.id).path).files  # type: ignore[arg-type]
                else:
                    now = tree_hash_uncached(scratch.object_path(n.output_hash or "")).files
                check.problems.append(f"{what}: {_file_diff(now, lock_files)}")
        with main.lock():
            for check in checks:
                entry = entries.get(check.id)
                if not entry or entry["step"] == "input" or check.lock is None:
                    continue
                obj = main.object_path(check.lock)
                if obj.is_dir():
                    th = tree_hash_uncached(obj)
                    check.cached = th.digest
                    if th.digest != check.lock:
                        diff = _file_diff(th.files, entry["output_files"])
                        check.problems.append(f"cached object altered: {obj}: {diff}")
                mapped = main.lookup(entry.get("key", ""))
                if mapped is not None and mapped != check.lock:
                    check.problems.append(f"the cache maps its key to another object {mapped}")
    return checks


@click.command()
@recipe_options
@build_options
def verify(
    args: tuple[str, ...], cache: Path | None, as_json: bool, device: str, jobs: int | None
) -> None:
    """Rebuild every node into a temporary cache and compare it byte for byte with the lock."""
    import sys

    recipe_path, targets = split_args(args)
    checks = verify_build(recipe_path, cache, device, jobs, targets or None, quiet=as_json)
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
