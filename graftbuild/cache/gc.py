"""Garbage collection: delete cached objects that no lockfile references.

The roots are the objects named by every lockfile that a build registered in this cache
(``locks.json``, graftbuild/cache/roots.py) and by any lockfile given. A registered lockfile that
no longer exists is dropped from the registry. Action-cache entries that point at a removed
object and leftovers in ``tmp/`` go too. The whole run holds the cache's build lock, so no build
is half way through. Reports the bytes freed: the objects' size, and how much of it stays on
disk because output folders hard-link the same files.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graftbuild.errors import UserError

if TYPE_CHECKING:
    from graftbuild.cache.store import Store


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


def collect(
    store: Store,
    extra_locks: list[Path],
    pinned_by: Callable[[Path], set[str] | None],
    dry_run: bool,
) -> GcReport:
    """Remove (``dry_run``: only report) every object that no lockfile pins. The lockfiles are
    the registered ones and ``extra_locks``; ``pinned_by(lock)`` gives the objects one pins
    (None: it no longer exists) and raises UserError when it cannot be read."""
    from graftbuild.cache import roots as registry_file
    from graftbuild.cache.schemas import action_output, read_json

    report = GcReport()
    with store.lock():
        registry = registry_file.registered(store)
        candidates = {str(p.resolve()) for p in extra_locks} | set(registry)
        roots: set[str] = set()
        for lock in sorted(candidates):
            try:
                pinned = pinned_by(Path(lock))
            except UserError as e:
                raise UserError(f"gc: refusing to collect, cannot read a lockfile: {e}") from None
            if pinned is None:
                report.dropped_locks.append(lock)
                continue
            report.locks.append(lock)
            roots |= pinned
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
            out = action_output(read_json(a))
            if out is None or out in removed or not store.has_object(out):
                stale_actions.append(a)
        report.actions_removed = len(stale_actions)
        if dry_run:
            return report
        for a in stale_actions:  # actions first: never an action pointing at a missing object
            a.unlink(missing_ok=True)
        for obj in garbage:  # renamed out of objects/ first: never a half-deleted object
            store.discard_path(obj)
        for p in leftovers:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        for lock in report.dropped_locks:
            registry.pop(lock, None)
        if report.dropped_locks:
            registry_file.save(store, registry)
    return report
