"""The lockfile: ``<recipe>.lock`` beside the recipe, pinning every input and output by hash.

Sorted, indented JSON (diff-friendly; no timestamps, so a rebuild that reproduces the same bytes
leaves it unchanged). Per node: its step and version, key, normalised config, input file hashes,
upstream output hashes, its output hash and per-file hashes, and which environment recorded it.
Environments (package versions, device, threads, the CPU kernels and MKL path in effect, the
CPU's instruction set; graftbuild/weights/determinism.py) are listed once under
``environments`` and named by id; a node built now names the environment it ran in, measured
where it ran (a Ray worker's own). Versions come from ``importlib.metadata``, so
writing the lock after a no-op build does not import torch.

``make --locked`` checks the lock before building (``check_inputs``: a differing input is a
UserError, exit 2, naming it) and after (``update``: a rebuilt node whose bytes differ from the
lock is a BuildError, exit 1), and never rewrites the lock.

The cache keeps a registry of the lockfiles written into it (``locks.json``,
graftbuild/cache/roots.py): what ``graftbuild gc`` keeps alive.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from graftbuild.cache.hashing import hash_obj, open_regular, tree_hash_uncached
from graftbuild.cache.integrity import read_manifest
from graftbuild.cache.roots import register
from graftbuild.errors import BuildError, UserError
from graftbuild.weights.determinism import PACKAGES

if TYPE_CHECKING:
    from graftbuild.build.graph import BuildGraph
    from graftbuild.build.results import MakeResult
    from graftbuild.cache.store import Store
    from graftbuild.recipe import Recipe
    from graftbuild.steps.base import BuildSettings, Node


class Build(Protocol):
    """What the lock reads of a build (the engine's state after a run)."""

    recipe: Recipe
    graph: BuildGraph
    store: Store
    settings: BuildSettings
    traces: dict[str, Any]


LOCK_FORMAT = 1
PINNED = (*PACKAGES, "device", "threads", "cpu_capability", "MKL_CBWR", "mkl_branch")
"""Environment fields that must match the lock for a node that ``make --locked`` rebuilds."""


def lock_path(recipe: Path) -> Path:
    return recipe.with_suffix(".lock")


def environment(settings: BuildSettings, load_torch: bool = False) -> dict[str, Any]:
    """This process's environment (weights/determinism.py): what may change a step's bytes
    without changing its key (docs/REPRODUCIBILITY.md)."""
    from graftbuild.weights.determinism import environment as measured

    return measured(settings.device, load_torch)


def load(path: Path) -> dict[str, Any] | None:
    """The lockfile at ``path`` (None: there is none), validated by its schema (``LockDoc``):
    a lock of the wrong shape is a UserError naming the file and the first bad key, never a
    crash further on. ``make`` replaces such a lock; ``--locked``, ``verify`` and ``gc``
    refuse it."""
    from pydantic import ValidationError

    try:
        with open(open_regular(path), encoding="utf-8") as f:  # a FIFO is refused, not read
            doc = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path}: not a valid lockfile ({e})") from None
    if not isinstance(doc, dict) or doc.get("graftbuild_lock") != LOCK_FORMAT:
        raise UserError(f"{path}: not a graftbuild lockfile of format {LOCK_FORMAT}")
    try:
        _lock_schema().model_validate(doc)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"{path}: not a valid lockfile ({where}: {first['msg']})") from None
    return doc


def _lock_schema() -> Any:
    """The lockfile's pydantic schema (built on first use: pydantic stays off the no-op path)."""
    global _LOCK_DOC
    if _LOCK_DOC is not None:
        return _LOCK_DOC
    from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

    class Loose(BaseModel):
        model_config = ConfigDict(extra="allow")

    class Dep(Loose):
        node: StrictStr
        hash: StrictStr

    class FileRef(Loose):
        path: StrictStr
        hash: StrictStr

    class LockNode(Loose):
        step: StrictStr
        output: StrictStr
        output_files: dict[str, StrictStr] = Field(default_factory=dict)
        key: StrictStr | None = None
        components: dict[str, StrictInt] = Field(default_factory=dict)
        config: dict[str, Any] = Field(default_factory=dict)
        deps: dict[str, Dep] = Field(default_factory=dict)
        files: dict[str, FileRef] = Field(default_factory=dict)
        env: StrictStr | None = None

    class LockDoc(Loose):
        graftbuild_lock: StrictInt
        nodes: dict[str, LockNode] = Field(default_factory=dict)
        environments: dict[str, dict[str, Any]] = Field(default_factory=dict)
        recipe: StrictStr | None = None

    _LOCK_DOC = LockDoc
    return LockDoc


_LOCK_DOC: Any = None


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _rel(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


# -- writing ----------------------------------------------------------------------------------


def update(engine: Build, result: MakeResult, locked: bool = False) -> Path:
    """Record ``result`` in the recipe's lock (merged with entries of nodes not built now).

    With ``locked``, compare instead: a node whose output differs from the lock is an error and
    the lock is left as it was.
    """
    recipe_path = engine.recipe.path
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
            if n.id in old_nodes
            and old_nodes[n.id].get("output") != n.output_hash
            and not _within_gpu_tolerance(engine, n, old_nodes[n.id], old)
        ]
        if drift:
            raise BuildError(
                f"make --locked: {len(drift)} node(s) rebuilt to bytes that differ from "
                f"{path.name} (a nondeterministic step or a different environment; see "
                "docs/REPRODUCIBILITY.md):\n  " + "\n  ".join(drift)
            )
        return path

    envs: dict[str, Any] = dict(old.get("environments", {}))

    def env_id(env: dict[str, Any]) -> str:
        key = hash_obj(env)[:12]
        envs[key] = env
        return key

    here = env_id(environment(engine.settings))
    nodes = {k: v for k, v in old_nodes.items() if k in engine.graph.graph}
    for n in result.nodes:
        node = engine.graph.node(n.id)
        prev = old_nodes.get(n.id, {})
        # a node built now records where it ran (a Ray worker reports its own)
        built_in = env_id(n.env) if n.env is not None else here
        nodes[n.id] = _entry(engine, node, n.action, prev, built_in)
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
    register(engine.store, path, recipe_path)
    return path


def _entry(
    engine: Build, node: Node, action: str | None, prev: dict[str, Any], env_id: str
) -> dict[str, Any]:
    root = engine.recipe.root
    trace = engine.traces[node.id]
    digest = trace["output"]
    same = prev.get("output") == digest
    if node.is_input:
        assert node.path is not None
        # a hub id is pinned by id and snapshot commit, not by this machine's cache path
        where = dict(node.config) if "hub" in node.config else {"path": _rel(node.path, root)}
        return {
            "step": "input",
            **where,
            "output": digest,
            "output_files": trace["files"],
        }
    parts = trace["parts"]
    if same and "output_files" in prev:
        files = prev["output_files"]
    else:
        files = _object_files(engine, digest)
    return {
        "step": parts["step"],
        "key": trace["key"],
        **({"components": parts["components"]} if parts.get("components") else {}),
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


def _within_gpu_tolerance(engine: Build, n: Any, entry: dict[str, Any], lock: dict) -> bool:
    """A node built on a GPU (now or in the lock) is held to the same values within
    ``GPU_TOLERANCE``, not to the same bytes: GPU kernels are not bit-reproducible across runs
    and devices (docs/REPRODUCIBILITY.md). Needs the locked object in the cache to compare."""
    from graftbuild.weights.compare import GPU_TOLERANCE, max_relative_difference

    devices = {str((n.env or {}).get("device", "cpu"))}
    devices.add(str(lock.get("environments", {}).get(entry.get("env"), {}).get("device", "cpu")))
    if devices == {"cpu"} or n.output_hash is None:
        return False
    locked = engine.store.object_path(entry["output"])
    if not locked.is_dir():
        return False
    rebuilt = engine.store.object_path(n.output_hash)
    return max_relative_difference(rebuilt, locked) <= GPU_TOLERANCE


# -- checking ---------------------------------------------------------------------------------


def _first_diff(now: Any, lock: Any, where: str) -> str:
    """The first leaf where two JSON values differ, as ``where: now (lock: before)``."""
    if isinstance(now, dict) and isinstance(lock, dict):
        for k in sorted(set(now) | set(lock)):
            if k not in now or k not in lock or hash_obj(now[k]) != hash_obj(lock[k]):
                return _first_diff(now.get(k), lock.get(k), f"{where}.{k}")
    return f"{where} = {json.dumps(now)} (lock: {json.dumps(lock)})"


def check_inputs(engine: Build, targets: list[str] | None = None) -> None:
    """Raise a UserError naming every input of the targets that differs from the lock."""
    from graftbuild.steps import STEPS

    recipe_path = engine.recipe.path
    assert recipe_path is not None
    path = lock_path(recipe_path)
    lock = load(path)
    if lock is None:
        raise UserError(
            f"make --locked: no lockfile {path}; run `graftbuild make` once without --locked"
        )
    root = engine.recipe.root
    nodes: dict[str, Any] = lock.get("nodes", {})
    env_now: dict[str, Any] | None = None  # measured (torch loaded) once a node must rebuild
    problems: list[str] = []
    order = engine.graph.order(targets)
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
            if "hub" in node.config and entry.get("revision") != node.config["revision"]:
                problems.append(
                    f"{node.id}: {node.config['hub']} resolves to revision "
                    f"{node.config['revision']}, the lock pins {entry.get('revision')}"
                )
                continue
            if not node.path.is_dir():
                problems.append(f"{node.id}: folder not found: {_rel(node.path, root)}")
                continue
            th = engine.store.stat_cache.tree(node.path)
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
        lock_components = entry.get("components", {})
        for k in sorted(set(node.components) | set(lock_components)):
            if node.components.get(k) != lock_components.get(k):
                problems.append(
                    f"{node.id}: {k} is version {node.components.get(k)} here and "
                    f"{lock_components.get(k)} in the lock"
                )
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
            digest = engine.store.stat_cache.input_hash(p).digest
            if digest != lock_files.get(role, {}).get("hash"):
                label = node.labels.get(f"file:{role}", f"file '{role}' changed")
                problems.append(f"{node.id}: {_rel(p, root)} differs from the lock ({label})")
        lock_deps = {r: d.get("node") for r, d in entry.get("deps", {}).items()}
        if lock_deps != dict(node.deps):
            problems.append(f"{node.id}: its inputs {node.deps} differ from the lock's {lock_deps}")
        if engine.store.lookup(entry.get("key", "")) is None:
            if env_now is None:
                env_now = environment(engine.settings, load_torch=True)
            env_lock = lock.get("environments", {}).get(entry.get("env"), {})
            for k in PINNED:
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


def referenced_objects(lock: dict[str, Any]) -> set[str]:
    """Object hashes a lock pins (input nodes live outside the cache)."""
    return {
        e["output"]
        for e in lock.get("nodes", {}).values()
        if e.get("step") != "input" and isinstance(e.get("output"), str)
    }


def _object_files(engine: Build, digest: str) -> dict[str, str]:
    """Per-file hashes of an object, from its manifest (written when the object was committed
    and checked whenever a build uses it): re-reading the object would read every byte of
    every model built, 9 GB for a 3 GB fuse with its two exact packs."""
    obj = engine.store.object_path(digest)
    manifest = read_manifest(obj)
    if manifest is not None:
        return {rel: h for rel, (_, h) in sorted(manifest.items())}
    return tree_hash_uncached(obj).files  # an object from before manifests: read it
