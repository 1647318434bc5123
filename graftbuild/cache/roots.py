"""The cache's garbage-collection roots: the lockfiles that builds into it wrote (``locks.json``).

``make`` registers its recipe's lockfile here; ``gc`` keeps every object a registered (or given)
lockfile names and drops the registration of a lockfile that no longer exists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from graftbuild.cache.store import Store

REGISTRY = "locks.json"


def register(store: Store, lock: Path, recipe: Path) -> None:
    """Remember that ``lock`` references objects in this cache (``gc`` keeps them)."""
    reg = registered(store)
    key = str(lock.resolve())
    if reg.get(key) == str(recipe):
        return
    reg[key] = str(recipe)
    save(store, reg)


def save(store: Store, registry: dict[str, str]) -> None:
    path = store.root / REGISTRY
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"locks": registry}, indent=1, sort_keys=True))
    os.replace(tmp, path)


def registered(store: Store) -> dict[str, str]:
    """Lockfile path -> recipe path, for every lock written by a build into this cache."""
    from graftbuild.cache.schemas import read_json, registry_locks

    return registry_locks(read_json(store.root / REGISTRY))[0]  # malformed entries: absent
