"""The lockfile: ``<recipe>.lock`` beside the recipe, pinning every input and output by hash.

Sorted, indented JSON (diff-friendly; no timestamps, so a rebuild that reproduces the same bytes
leaves it unchanged). Per node: its step and version, key, normalised config, input file hashes,
upstream output hashes, its output hash and per-file hashes, and which environment recorded it.
Environments (graftbuild/torch/transformers versions, device and thread settings) are listed
once under ``environments`` and named by id. Versions come from ``importlib.metadata``, so
writing the lock after a no-op build does not import torch.

``make --locked`` checks the lock before building (``check_inputs``: a differing input is a
UserError, exit 2, naming it) and after (``update``: a rebuilt node whose bytes differ from the
lock is a BuildError, exit 1), and never rewrites the lock.

The cache keeps a registry of the lockfiles written into it (``locks.json``), which is what
``graftbuild gc`` keeps alive.
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graftbuild.errors import BuildError, UserError
from graftbuild.hashing import hash_obj, tree_hash_uncached
from graftbuild.integrity import read_manifest

if TYPE_CHECKING:
    from graftbuild.graph import Node
    from graftbuild.scheduler import MakeResult, Scheduler
    from graftbuild.steps.base import BuildSettings
    from graftbuild.store import Store

LOCK_FORMAT = 1
REGISTRY = "locks.json"
PACKAGES = ("graftbuild", "torch", "transformers", "safetensors", "numpy")
TRAINING = ("trl", "datasets", "accelerate", "peft")
"""Recorded too: the training stack of the sft and dpo steps (None where not installed)."""
PINNED = (*PACKAGES, "device", "threads")
"""Environment fields that must match the lock for a node that ``make --locked`` rebuilds."""


def lock_path(recipe: Path) -> Path:
    return recipe.with_suffix(".lock")


def environment(settings: BuildSettings) -> dict[str, Any]:
    """What may change a step's bytes without changing its key (docs/REPRODUCIBILITY.md)."""
    env: dict[str, Any] = {}
    for pkg in (*PACKAGES, *TRAINING):
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[pkg] = None
    env |= {
        "python": platform.python_version(),
        "platform": f"{platform.system()}-{platform.machine()}",
        "device": settings.device,
        "threads": settings.threads,
        "cpu_count": os.cpu_count(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    return env


def load(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise UserError(f"{path}: not a valid lockfile ({e})") from None
    if not isinstance(doc, dict) or doc.get("graftbuild_lock") != LOCK_FORMAT:
        raise UserError(f"{path}: not a graftbuild lockfile of format {LOCK_FORMAT}")
    return doc


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _rel(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


# -- writing ----------------------------------------------------------------------------------


def update(sched: Scheduler, result: MakeResult, locked: bool = False) -> Path:
    """Record ``result`` in the recipe's lock (merged with entries of nodes not built now).

    With ``locked``, compare instead: a node whose output differs from the lock is an error and
    the lock is left as it was.
    """
    recipe_path = sched.recipe.path
    assert recipe_path is not None
    path = lock_path(recipe_path)
    try:
        old = load(path) or {}
    except UserError:
        if locked:
            raise
        old = {}  # an unreadable lock is replaced by a fresh one
    old_nodes: dict[str, Any] = old.get("nodes", {})
    if locked:
        drift = [
            f"{n.id}: rebuilt to {n.output_hash}, the lock has {old_nodes[n.id]['output']}"
            for n in result.nodes
            if n.id in old_nodes and old_nodes[n.id].get("output") != n.output_hash
        ]
        if drift:
            raise BuildError(
                f"make --locked: {len(drift)} node(s) rebuilt to bytes that differ from "
                f"{path.name} (a nondeterministic step or a different environment; see "
                "docs/REPRODUCIBILITY.md):\n  " + "\n  ".join(drift)
            )
        return path

    env = environment(sched.settings)
    env_id = hash_obj(env)[:12]
    envs: dict[str, Any] = dict(old.get("environments", {}))
    envs[env_id] = env
    nodes = {k: v for k, v in old_nodes.items() if k in sched.graph.graph}
    for n in result.nodes:
        node = sched.graph.node(n.id)
        prev = old_nodes.get(n.id, {})
        nodes[n.id] = _entry(sched, node, n.action, prev, env_id)
    used = {e.get("env") for e in nodes.values()}
    doc = {
        "graftbuild_lock": LOCK_FORMAT,
        "recipe": recipe_path.name,
        "environments": {k: v for k, v in envs.items() if k in used},
        "nodes": nodes,
    }
    text = dumps(doc)
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    register(sched.store, path, recipe_path)
    return path


def _entry(
    sched: Scheduler, node: Node, action: str | None, prev: dict[str, Any], env_id: str
) -> dict[str, Any]:
    root = sched.recipe.root
    trace = sched.traces[node.id]
    digest = trace["output"]
    same = prev.get("output") == digest
    if node.is_input:
        assert node.path is not None
        return {
            "step": "input",
            "path": _rel(node.path, root),
            "output": digest,
            "output_files": trace["files"],
        }
    parts = trace["parts"]
    if same and "output_files" in prev:
        files = prev["output_files"]
    else:
        files = _object_files(sched, digest)
    return {
        "step": parts["step"],
        "key": trace["key"],
        "config": node.config,
        "deps": {r: {"node": d, "hash": parts["deps"][r]} for r, d in sorted(node.deps.items())},
        "files": {
            r: {"path": _rel(p, root), "hash": parts["files"][r]}
            for r, p in sorted(node.files.items())
        },
        "output": digest,
        "output_files": files,
        "env": prev["env"] if same and action != "built" and "env" in prev else env_id,
    }


# -- checking ---------------------------------------------------------------------------------


def _first_diff(now: Any, lock: Any, where: str) -> str:
    """The first leaf where two JSON values differ, as ``where: now (lock: before)``."""
    if isinstance(now, dict) and isinstance(lock, dict):
        for k in sorted(set(now) | set(lock)):
            if k not in now or k not in lock or hash_obj(now[k]) != hash_obj(lock[k]):
                return _first_diff(now.get(k), lock.get(k), f"{where}.{k}")
    return f"{where} = {json.dumps(now)} (lock: {json.dumps(lock)})"


def check_inputs(sched: Scheduler, targets: list[str] | None = None) -> None:
    """Raise a UserError naming every input of the targets that differs from the lock."""
    from graftbuild.steps import STEPS

    recipe_path = sched.recipe.path
    assert recipe_path is not None
    path = lock_path(recipe_path)
    lock = load(path)
    if lock is None:
        raise UserError(
            f"make --locked: no lockfile {path}; run `graftbuild make` once without --locked"
        )
    root = sched.recipe.root
    nodes: dict[str, Any] = lock.get("nodes", {})
    env_now = environment(sched.settings)
    problems: list[str] = []
    order = sched.graph.order(targets)
    if not targets:
        problems += [
            f"{nid}: in the lock but no longer in the recipe"
            for nid in sorted(set(nodes) - {n.id for n in order})
        ]
    for node in order:
        entry = nodes.get(node.id)
        if entry is None:
            problems.append(f"{node.id}: not in the lock (new in the recipe)")
            continue
        if node.is_input:
            assert node.path is not None
            if not node.path.is_dir():
                problems.append(f"{node.id}: folder not found: {_rel(node.path, root)}")
                continue
            th = sched.store.stat_cache.tree(node.path)
            if th.digest != entry.get("output"):
                before = entry.get("output_files", {})
                changed = sorted(
                    k for k in set(before) | set(th.files) if before.get(k) != th.files.get(k)
                )
                shown = ", ".join(f"{_rel(node.path / c, root)}" for c in changed[:5])
                problems.append(f"{node.id}: {shown} differ from the lock")
            continue
        step = f"{node.step}@{STEPS[node.step].version}"
        if entry.get("step") != step:
            problems.append(f"{node.id}: step {step} differs from the lock's {entry.get('step')}")
        lock_cfg = entry.get("config", {})
        for k in sorted(set(node.config) | set(lock_cfg)):
            if hash_obj(node.config.get(k)) != hash_obj(lock_cfg.get(k)):
                label = node.labels.get(f"config.{k}", f"setting '{k}' changed")
                detail = _first_diff(node.config.get(k), lock_cfg.get(k), k)
                problems.append(f"{node.id}: {label}: {detail}")
        lock_files = entry.get("files", {})
        for role, p in sorted(node.files.items()):
            if not p.exists():
                raise UserError(f"{recipe_path}: {node.id} {role}: path not found: {p}")
            digest = sched.store.stat_cache.input_hash(p).digest
            if digest != lock_files.get(role, {}).get("hash"):
                label = node.labels.get(f"file:{role}", f"file '{role}' changed")
                problems.append(f"{node.id}: {_rel(p, root)} differs from the lock ({label})")
        lock_deps = {r: d.get("node") for r, d in entry.get("deps", {}).items()}
        if lock_deps != dict(node.deps):
            problems.append(f"{node.id}: its inputs {node.deps} differ from the lock's {lock_deps}")
        if sched.store.lookup(entry.get("key", "")) is None:
            env_lock = lock.get("environments", {}).get(entry.get("env"), {})
            pinned = PINNED
            if env_lock.get("threads") is None:  # torch's default follows the machine
                pinned = (*PINNED, "cpu_count", "OMP_NUM_THREADS")
            for k in pinned:
                if k in env_lock and env_lock[k] != env_now.get(k):
                    problems.append(
                        f"{node.id}: must be rebuilt, but {k} is {env_now.get(k)!r} here and "
                        f"{env_lock[k]!r} in the lock"
                    )
    if problems:
        raise UserError(
            f"make --locked: {len(problems)} difference(s) from {path}:\n  "
            + "\n  ".join(problems)
            + "\nrun `graftbuild make` without --locked to accept them and update the lock"
        )


# -- the cache's registry of lockfiles ----------------------------------------------------------


def register(store: Store, lock: Path, recipe: Path) -> None:
    """Remember that ``lock`` references objects in this cache (``gc`` keeps them)."""
    reg = registered(store)
    key = str(lock.resolve())
    if reg.get(key) == str(recipe):
        return
    reg[key] = str(recipe)
    path = store.root / REGISTRY
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"locks": reg}, indent=1, sort_keys=True))
    os.replace(tmp, path)


def registered(store: Store) -> dict[str, str]:
    """Lockfile path -> recipe path, for every lock written by a build into this cache."""
    try:
        doc = json.loads((store.root / REGISTRY).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    locks = doc.get("locks") if isinstance(doc, dict) else None
    return dict(locks) if isinstance(locks, dict) else {}


def referenced_objects(lock: dict[str, Any]) -> set[str]:
    """Object hashes a lock pins (input nodes live outside the cache)."""
    return {
        e["output"]
        for e in lock.get("nodes", {}).values()
        if e.get("step") != "input" and isinstance(e.get("output"), str)
    }


def _object_files(sched: Scheduler, digest: str) -> dict[str, str]:
    """Per-file hashes of an object, from its manifest (written when the object was committed
    and checked whenever a build uses it): re-reading the object would read every byte of
    every model built, 9 GB for a 3 GB fuse with its two exact packs."""
    obj = sched.store.object_path(digest)
    manifest = read_manifest(obj)
    if manifest is not None:
        return {rel: h for rel, (_, h) in sorted(manifest.items())}
    return tree_hash_uncached(obj).files  # an object from before manifests: read it
