"""The no-op fast path: answer "nothing to do" from a record of the last build, by stat alone.

Planning a build imports networkx and pydantic, validates the recipe and walks the graph: about
a second of imports before the first stat. When nothing changed, none of that is needed. After
every successful ``make`` we record what the build depended on:

- the recipe's bytes (hash) and path, the targets, the cache folder (the record lives in it);
- the stat signature (size, mtime_ns, ctime_ns, inode) of every input file and folder the stat
  cache looked at, *as of when it was hashed* (a change during the build is caught next time);
- the materialised output folders (every file, our marker included) and the cache objects
  they come from;
- graftbuild's own source files (a new version may build differently).

The next ``make``/``plan`` with the same recipe and targets first re-stats exactly those paths
(tens of milliseconds for a few hundred files); if every signature matches, it prints the
previous result and stops, without importing torch, networkx, pydantic, click or rich. Any
difference, or anything unexpected, falls back to the full planner, which then decides; so
does a reboot after a build whose objects may not have reached the disk (graftbuild/durability.py:
their stat may be unchanged while their bytes are lost).
A slow-path ``make`` deletes the record before it builds and writes a new one after success.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from graftbuild import __version__
from graftbuild.cache import durability
from graftbuild.cache.hashing import hash_bytes, hash_obj, iter_files, signature

RECORD_VERSION = 2
PACKAGE = Path(__file__).resolve().parents[1]
"""graftbuild's own source tree (its files are watched)."""


def cache_root(recipe_path: Path, recipe_bytes: bytes, override: Path | None) -> Path:
    """The cache folder, found the way ``build.engine.cache_dir`` finds it, with tomllib alone."""
    if override is not None:
        return Path(os.path.abspath(override))
    env = os.environ.get("GRAFTBUILD_CACHE")
    if env:
        return Path(os.path.abspath(env))
    import tomllib

    project = tomllib.loads(recipe_bytes.decode()).get("project", {})
    cache = project.get("cache") if isinstance(project, dict) else None
    if not isinstance(cache, str):
        return recipe_path.parent / "cache"
    path = Path(cache).expanduser()
    if not path.is_absolute():
        path = recipe_path.parent / path
    return path.resolve()


def record_path(cache: Path, recipe_path: Path, targets: list[str]) -> Path:
    return cache / "noop" / f"{hash_obj([str(recipe_path), sorted(targets)])[:24]}.json"


def code_signatures() -> dict[str, list[int]]:
    """Signatures of graftbuild's own ``.py`` files (an upgrade or an edit voids the record)."""
    out: dict[str, list[int]] = {}
    for _, p in iter_files(PACKAGE, keep=lambda rel: rel.endswith(".py")):
        out[str(p)] = signature(p)
    return out


def forget(cache: Path, recipe_path: Path, targets: list[str]) -> None:
    record_path(cache, recipe_path, targets).unlink(missing_ok=True)


def save(
    cache: Path,
    recipe_path: Path,
    recipe_bytes: bytes,
    targets: list[str],
    seen: dict[str, list[int]],
    nodes: list[dict[str, Any]],
    gates: list[dict[str, Any]] | None = None,
    links: dict[str, str] | None = None,
) -> None:
    """Record a successful build. ``seen``: input paths -> signatures from the stat cache;
    ``nodes``: id, action, output, output_hash of each node, in build order; ``links``: each
    recipe path as written -> what it resolved to (a retargeted link voids the record)."""
    watched = dict(seen)
    for n in nodes:
        if n.get("object"):
            watched[n["object"]] = signature(n["object"])
        out = n.get("output")
        if out and n["kind"] != "input" and os.path.isdir(out):
            for _, p in iter_files(Path(out), keep=lambda rel: True, on_dir=None):
                watched[str(p)] = signature(p)
            watched[out] = signature(out)
    record = {
        "version": RECORD_VERSION,
        "graftbuild": __version__,
        "recipe": str(recipe_path),
        "recipe_hash": hash_bytes(recipe_bytes),
        "targets": sorted(targets),
        "code": code_signatures(),
        "watched": watched,
        "nodes": nodes,
        "gates": gates or [],
        "links": links or {},
    }
    path = record_path(cache, recipe_path, targets)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, sort_keys=True))
    os.replace(tmp, path)


def check(recipe_path: Path, targets: list[str], override: Path | None) -> dict[str, Any] | None:
    """The last build's record if nothing it depended on changed since; None otherwise."""
    try:
        recipe_path = recipe_path.resolve()
        if not stat.S_ISREG(os.stat(recipe_path).st_mode):  # a FIFO: never opened here
            return None
        recipe_bytes = recipe_path.read_bytes()
        cache = cache_root(recipe_path, recipe_bytes, override)
        if durability.unsynced_elsewhere(cache):  # a reboot since a deferred build: recheck
            return None
        record = json.loads(record_path(cache, recipe_path, targets).read_bytes())
        if (
            record.get("version") != RECORD_VERSION
            or record.get("graftbuild") != __version__
            or record.get("recipe") != str(recipe_path)
            or record.get("recipe_hash") != hash_bytes(recipe_bytes)
            or record.get("targets") != sorted(targets)
            or record.get("code") != code_signatures()
        ):
            return None
        for path, sig in record["watched"].items():
            if signature(path) != sig:
                return None
        for path, target in record["links"].items():  # resolved as the planner resolves them
            if os.path.realpath(path) != target:
                return None
        return record
    except Exception:  # no record, unreadable record, a path gone: the planner decides
        return None


def read_metrics(node: dict[str, Any]) -> dict[str, Any] | None:
    if not node["id"].startswith("eval:") or not node.get("object"):
        return None
    try:
        return json.loads((Path(node["object"]) / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
