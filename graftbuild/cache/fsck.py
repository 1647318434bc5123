"""fsck: re-read every cached object, and the materialised outputs, checking each byte against
the hashes it was stored under.

``make`` checks objects cheaply on every use (files whose stat is unchanged keep their recorded
hash); this reads everything, so it also finds damage that left the stat untouched. With
``repair`` a corrupt object is removed (the next ``make`` rebuilds it) and a damaged output is
materialised again from its intact object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from graftbuild.cache.store import Store


@dataclass
class Problem:
    kind: str
    """"object", "output", "action" or "state" (the stat cache, traces, lock registry)."""
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


def run_fsck(
    store: Store, outputs: list[tuple[str, Path]] | None = None, repair: bool = False
) -> FsckReport:
    """Check (and with ``repair`` fix) ``store`` and the output folders ``outputs`` ((node id,
    folder) of a recipe's nodes) materialised from it. The caller holds the store's lock."""
    from graftbuild.cache.hashing import hash_file
    from graftbuild.cache.integrity import check_copy, check_object, read_manifest
    from graftbuild.cache.schemas import action_output, read_json
    from graftbuild.cache.store import MARKER

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
            store.discard_path(obj)

    for entry in sorted((store.root / "actions").glob("*/*.json")):
        if action_output(read_json(entry)) is None:
            report.problems.append(Problem("action", str(entry), "malformed", repaired=repair))
            if repair:
                entry.unlink(missing_ok=True)
    _check_state(store, report, repair)

    for node_id, dest in outputs or []:
        if not (dest / MARKER).is_file():
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
            store.materialize(digest, dest, node_id, reason=problem)
            report.problems[-1].repaired = True
    store.stat_cache.dirty = True
    store.stat_cache.save()
    return report


def _check_state(store: Store, report: FsckReport, repair: bool) -> None:
    """Report (and with ``repair`` drop) entries of the state files that do not match their
    schemas (cache/schemas.py). Builds already treat them as absent; repairing rewrites the
    files without them. The stat cache is rewritten without them by every run."""
    from graftbuild.cache import roots
    from graftbuild.cache.schemas import read_json, registry_locks, trace_nodes
    from graftbuild.cache.store import atomic_write

    if store.stat_cache.dropped:
        where = str(store.root / "stat.json")
        why = f"{store.stat_cache.dropped} malformed entries (ignored; dropped when saved)"
        report.problems.append(Problem("state", where, why, repaired=True))
    for path in sorted((store.root / "traces").glob("*.json")):
        data = read_json(path)
        nodes, dropped = trace_nodes(data)
        if data is None and path.stat().st_size:
            dropped = 1
        if not dropped:
            continue
        report.problems.append(
            Problem("state", str(path), f"{dropped} malformed trace entries", repaired=repair)
        )
        if repair:
            recipe = data.get("recipe") if isinstance(data, dict) else None
            atomic_write(path, json.dumps({"recipe": recipe, "nodes": nodes}, sort_keys=True))
    reg = store.root / roots.REGISTRY
    data = read_json(reg)
    locks, dropped = registry_locks(data)
    if data is None and reg.is_file() and reg.stat().st_size:
        dropped = 1
    if dropped:
        report.problems.append(
            Problem("state", str(reg), f"{dropped} malformed lock registrations", repaired=repair)
        )
        if repair:
            roots.save(store, locks)
