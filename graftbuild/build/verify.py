"""``verify``: rebuild everything, compare with the lockfile.

Every node is rebuilt into a temporary cache (``<cache>/verify/``, removed afterwards; nothing is
materialised and the lockfile is not touched), and its bytes are compared with the lockfile's
output hash, file by file (xxh3-128). The objects the lock names in the real cache are re-read
too, so a cached artifact that was altered after it was built is reported as well.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from graftbuild.progress import NullReporter, Reporter


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
        return {**asdict(self), "ok": self.ok}


def _file_diff(now: dict[str, str], lock: dict[str, str]) -> str:
    changed = sorted(k for k in set(now) | set(lock) if now.get(k) != lock.get(k))
    return ", ".join(changed[:5]) + (" …" if len(changed) > 5 else "")


def verify_build(
    recipe_path: Path,
    cache: Path | None,
    device: str = "cpu",
    jobs: int | None = None,
    targets: list[str] | None = None,
    reporter: Reporter | None = None,
) -> list[NodeCheck]:
    """Rebuild every node (of ``targets``) into a scratch cache beside the recipe's and compare
    each with the lock, and the objects the lock names in the real cache with their hashes."""
    from graftbuild.build import lockfile
    from graftbuild.build.engine import Engine, cache_dir
    from graftbuild.cache.hashing import tree_hash_uncached
    from graftbuild.cache.store import Store
    from graftbuild.errors import UserError
    from graftbuild.recipe import load_recipe
    from graftbuild.steps.base import BuildSettings

    recipe = load_recipe(recipe_path)
    assert recipe.path is not None
    lock_file = lockfile.lock_path(recipe.path)
    lock = lockfile.load(lock_file)
    if lock is None:
        raise UserError(f"no lockfile {lock_file}; run `graftbuild make` first")
    entries: dict[str, Any] = lock.get("nodes", {})
    reporter = reporter or NullReporter()
    main = Store(cache_dir(recipe, cache))
    scratch_root = main.root / "verify"
    scratch_root.mkdir(exist_ok=True)
    checks: list[NodeCheck] = []
    with tempfile.TemporaryDirectory(prefix="run.", dir=scratch_root) as tmp:
        scratch = Store(Path(tmp))
        settings = BuildSettings(device=device, jobs=jobs or 1)
        # rebuild only: no output folder is touched, nor the recipe's lockfile
        engine = Engine(recipe, scratch, settings, reporter, outputs=False)
        result = engine.make(targets)
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
                    now = engine.store.stat_cache.tree(engine.graph.node(n.id).path).files  # type: ignore[arg-type]
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


@dataclass
class Agreement:
    """One node of this cache's build against another machine's (``verify --against``)."""

    id: str
    key: str | None
    here: str | None
    there: str | None
    difference: float | None = None
    """For a node built on a GPU: the largest relative difference of its tensors."""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def verify_against(
    recipe_path: Path,
    cache: Path | None,
    other: str,
    targets: list[str] | None = None,
    reporter: Reporter | None = None,
) -> list[Agreement]:
    """Compare, node by node, what this cache built for the recipe with what ``other`` (another
    machine's cache folder, or a remote cache URL) holds under the same keys. Keys do not
    depend on the machine, so equal inputs must have given equal outputs: bytes for CPU nodes,
    values within ``GPU_TOLERANCE`` for nodes the lock says were built on a GPU."""
    from graftbuild.build import lockfile
    from graftbuild.build.engine import Engine, cache_dir
    from graftbuild.cache.remote import Remote
    from graftbuild.cache.store import Store
    from graftbuild.errors import UserError
    from graftbuild.recipe import load_recipe
    from graftbuild.weights.compare import GPU_TOLERANCE, max_relative_difference

    recipe = load_recipe(recipe_path)
    reporter = reporter or NullReporter()
    main = Store(cache_dir(recipe, cache))
    engine = Engine(recipe, main, reporter=reporter, outputs=False)
    lock = lockfile.load(lockfile.lock_path(recipe.path)) or {}  # type: ignore[arg-type]
    envs, entries = lock.get("environments", {}), lock.get("nodes", {})
    remote: Remote | None = None
    theirs: Store | None = None
    if "://" in other:
        remote = Remote(other, reporter.log, strict=True)
    else:
        if not (Path(other) / "objects").is_dir():
            raise UserError(f"verify --against: {other} is not a graftbuild cache (no objects/)")
        theirs = Store(Path(other))
    checks: list[Agreement] = []
    with main.lock():
        planned = [n for n in engine.plan(targets) if not engine.graph.node(n.id).is_input]
        scratch_root = main.root / "verify"
        scratch_root.mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="against.", dir=scratch_root) as tmp:
            scratch = Store(Path(tmp))
            for n in planned:
                check = Agreement(n.id, n.key, n.output_hash, None)
                checks.append(check)
                if n.key is None or n.output_hash is None:
                    check.problems.append("not built in this cache; run graftbuild make first")
                    continue
                check.there = (
                    remote.lookup(n.key) if remote is not None else theirs.lookup(n.key)  # type: ignore[union-attr]
                )
                if check.there is None:
                    check.problems.append(f"{other} has no output for this node's key")
                    continue
                if check.there == check.here:
                    continue
                env = envs.get(entries.get(n.id, {}).get("env"), {})
                if str(env.get("device", "cpu")) == "cpu":
                    check.problems.append("built to other bytes there (a CPU node: must be equal)")
                    continue
                if remote is not None:
                    remote.download(check.there, scratch, n.id)
                    folder = scratch.object_path(check.there)
                else:
                    folder = theirs.object_path(check.there)  # type: ignore[union-attr]
                check.difference = max_relative_difference(main.object_path(n.output_hash), folder)
                if check.difference > GPU_TOLERANCE:
                    check.problems.append(
                        f"values differ by {check.difference:.3g} (GPU node, tolerance "
                        f"{GPU_TOLERANCE:g})"
                    )
    return checks
