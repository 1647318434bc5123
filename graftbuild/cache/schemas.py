"""Schemas of the cache's state files: the stat cache, action entries, traces, the lock registry.

These files are shortcuts and explanations, never the truth: an entry that does not match its
schema (a hand edit, a half-written file from another version, a disk error) is treated as
absent, so the worst a damaged state file can cost is a re-hash or a rebuild, never a crash or
a wrong answer. ``graftbuild fsck`` reports such entries and ``--repair`` drops them
(``mend``). The lockfile, which users read and commit, has its schema in
graftbuild/build/lockfile.py.

Imported only by the slow path (pydantic costs the no-op fast path ~100 ms).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
)

Digest = Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{32}$")]
"""An xxh3-128 hex digest: object names and keys are path components, so nothing else."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


StatEntry = tuple[Annotated[list[StrictInt], Field(min_length=5, max_length=5)], Digest]
"""(size, mtime_ns, ctime_ns, inode, link count) and the file's hash."""


class ActionEntry(BaseModel):
    """``actions/ab/<key>.json``: a node key -> its output object."""

    model_config = ConfigDict(extra="ignore")
    output: Digest
    node: StrictStr | None = None
    time: float | None = None


class TraceParts(_Strict):
    kind: StrictStr
    step: StrictStr
    config: dict[str, StrictStr]
    deps: dict[str, StrictStr]
    files: dict[str, StrictStr]
    components: dict[str, StrictInt] = Field(default_factory=dict)


class BuiltTrace(_Strict):
    """What the last build of a step node was made of (explains the next plan)."""

    key: Digest
    parts: TraceParts
    output: Digest


class InputTrace(_Strict):
    """An input folder's hash and per-file hashes at the last build."""

    output: Digest
    files: dict[str, StrictStr]


class TraceFile(BaseModel):
    model_config = ConfigDict(extra="ignore")
    recipe: StrictStr | None = None
    nodes: dict[str, Any]


class Registry(BaseModel):
    model_config = ConfigDict(extra="ignore")
    locks: dict[str, Any]


_STAT = TypeAdapter(StatEntry)
_STATS = TypeAdapter(dict[str, StatEntry])
_TRACE = TypeAdapter(BuiltTrace | InputTrace)


def read_json(path: Path) -> Any:
    """The parsed JSON of ``path``; None when missing or unreadable (treated as absent)."""
    from graftbuild.cache.files import open_regular
    from graftbuild.errors import UserError

    try:
        with open(open_regular(path), "rb") as f:  # not a FIFO: that would block
            return json.loads(f.read())
    except (OSError, ValueError, RecursionError, UserError):
        return None


def stat_entries(data: Any) -> tuple[dict[str, list[Any]], int]:
    """The valid entries of a stat cache, and how many were dropped."""
    if not isinstance(data, dict):
        return {}, 0 if data is None else 1
    try:
        _STATS.validate_python(data)  # the usual case: all valid, one fast pass
        return data, 0
    except ValidationError:
        pass
    good: dict[str, list[Any]] = {}
    for k, v in data.items():
        try:
            _STAT.validate_python(v)
            good[k] = v
        except ValidationError:
            pass
    return good, len(data) - len(good)


def action_output(data: Any) -> str | None:
    """The object an action entry names; None when the entry is malformed."""
    try:
        return ActionEntry.model_validate(data).output
    except ValidationError:
        return None


def trace_nodes(data: Any) -> tuple[dict[str, Any], int]:
    """The valid per-node entries of a trace file, and how many were dropped."""
    if data is None:
        return {}, 0
    try:
        nodes = TraceFile.model_validate(data).nodes
    except ValidationError:
        return {}, 1
    good = {}
    for node_id, entry in nodes.items():
        try:
            _TRACE.validate_python(entry)
            good[node_id] = entry
        except ValidationError:
            pass
    return good, len(nodes) - len(good)


def registry_locks(data: Any) -> tuple[dict[str, str], int]:
    """The valid lockfile -> recipe entries of the lock registry, and how many were dropped."""
    if data is None:
        return {}, 0
    try:
        locks = Registry.model_validate(data).locks
    except ValidationError:
        return {}, 1
    good = {k: v for k, v in locks.items() if isinstance(v, str) and Path(k).is_absolute()}
    return good, len(locks) - len(good)
