"""When the bytes a build writes reach the disk, and what is re-checked after a crash.

Two modes, process-global (:func:`set_mode`, :func:`using`):

- ``immediate``: every object file and folder is fsynced before the rename into ``objects/``
  (graftbuild/integrity.py ``write_manifest``, graftbuild/skillpack.py ``PackWriter.close``).
  The default of the module, so any process that does not choose otherwise (a Ray worker,
  ``pull``, ``verify``, the library used directly) keeps it; and the only mode where there is
  no boot id to detect a reboot with.
- ``deferred``: object data is not fsynced; the kernel writes it back (graftbuild/writing.py
  starts that writeback every 32 MiB). What ``graftbuild make`` uses unless given ``--fsync`` or
  ``GRAFTBUILD_FSYNC=1``; Nix and ccache do the same with their stores, mergekit never syncs.

Deferred objects are not trusted blindly after a crash. A small state file in the cache root,
``durability.json`` = ``{"boot": <boot id>, "unsynced_since": <unix time> | null}``, says that
files graftbuild wrote during boot ``boot`` at or after ``unsynced_since`` may not be on disk
yet. :func:`begin` opens that window (fsynced: one small fsync per build) before a deferred
build writes its first object byte; nothing ever closes it during the same boot.
:func:`recover`, run whenever a :class:`~graftbuild.cache.store.Store` is opened, notices a
window left open by an earlier boot (the machine restarted, perhaps by a crash or a power cut,
before everything was written back): it drops every stat-cache entry whose recorded mtime lies
in the window and every no-op record (graftbuild/build/noop.py, which trusts stat alone),
durably, and only then marks the state clean. The existing checks do the rest: an object is
verified through the stat cache each time a build uses it, so a file without an entry is read
again, and a damaged object is discarded and rebuilt; ``graftbuild fsck`` re-reads everything.

A file graftbuild writes gets an mtime at or after the window's start (2 s earlier than the
clock, for the kernel's coarse timestamps), and an mtime can only move forward with later
writes; so every file that can have lost bytes has a stat entry in the window (or none). This
relies on nothing in the cache having its mtime set back (the store copies with ``copyfile``,
never ``copy2``) and on the wall clock not being stepped back by more than the margin during a
build. A cache shared by ``make`` runs on several hosts (one filesystem) should use ``--fsync``:
the state holds a single boot id.

This module imports only the standard library: the no-op fast path reads the state too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

IMMEDIATE = "immediate"
DEFERRED = "deferred"
MODES = (IMMEDIATE, DEFERRED)

STATE = "durability.json"
LOCK = "durability.lock"
STAT_CACHE = "stat.json"  # see graftbuild/store.py
NOOP_RECORDS = "noop"  # see graftbuild/build/noop.py
MARGIN_S = 2.0
"""The window starts this much before the clock: file timestamps come from a coarse clock."""

BOOT_ID = "/proc/sys/kernel/random/boot_id"

_mode = IMMEDIATE


def boot_id() -> str | None:
    """The running kernel's boot id (changes with every boot), or None where there is none.

    Tests replace this function to simulate a reboot."""
    try:
        with open(BOOT_ID) as f:
            return f.read().strip() or None
    except OSError:
        return None


# -- the mode --------------------------------------------------------------------------------------


def mode() -> str:
    return _mode


def set_mode(new: str) -> str:
    """Select ``immediate`` or ``deferred`` for this process; returns the mode in effect, which
    is ``immediate`` where no boot id can be read (a reboot could not be detected)."""
    global _mode
    if new not in MODES:
        raise ValueError(f"durability mode must be one of {MODES}, not {new!r}")
    if new == DEFERRED and boot_id() is None:
        new = IMMEDIATE
    _mode = new
    return _mode


@contextlib.contextmanager
def using(new: str) -> Iterator[str]:
    """``set_mode(new)`` for the duration of a block (one ``make`` command), then restored."""
    global _mode
    previous = _mode
    try:
        yield set_mode(new)
    finally:
        _mode = previous


def requested(fsync: bool = False) -> str:
    """The mode a ``make`` asked for: immediate with ``--fsync`` or ``GRAFTBUILD_FSYNC`` set
    (to anything but ``0`` or nothing), deferred otherwise."""
    env = os.environ.get("GRAFTBUILD_FSYNC", "").strip()
    return IMMEDIATE if fsync or env not in ("", "0") else DEFERRED


def fsync_objects() -> bool:
    """Whether object files and folders must be fsynced before the rename into the store."""
    return _mode == IMMEDIATE


# -- the state file --------------------------------------------------------------------------------


def read_state(root: Path) -> dict[str, Any] | None:
    """The cache's state; None when there is none (nothing was ever written deferred). A state
    file that cannot be read (it is always written with fsync, so only damage does that) counts
    as a window open since the epoch in an unknown boot: everything is re-checked once."""
    try:
        raw = (Path(root) / STATE).read_bytes()
    except FileNotFoundError:
        return None
    except OSError:
        return {"boot": None, "unsynced_since": 0.0}
    try:
        state = json.loads(raw)
        since = state["unsynced_since"]
        if since is not None:
            since = float(since)
            if not 0 <= since < 1e12:  # NaN, infinite or negative: damage (a schema check
                raise ValueError(since)  # without pydantic: the no-op path reads this file)
        if not isinstance(state["boot"], str | None):
            raise TypeError(state["boot"])
        return {"boot": state["boot"], "unsynced_since": since}
    except (ValueError, KeyError, TypeError):
        return {"boot": None, "unsynced_since": 0.0}


def unsynced_elsewhere(root: Path, state: dict[str, Any] | None = None) -> bool:
    """True when files written during an earlier boot may have lost bytes: recovery is due."""
    if state is None:
        state = read_state(root)
    if state is None or state["unsynced_since"] is None:
        return False
    return state["boot"] is None or state["boot"] != boot_id()


def _write_state(root: Path, state: dict[str, Any]) -> None:
    _write_durably(root / STATE, json.dumps(state, sort_keys=True))


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialises changes of the state between processes (builds, plans, Ray workers)."""
    with open(root / LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- opening and closing the window ----------------------------------------------------------------


def begin(root: Path) -> None:
    """Called before a build writes object data: in deferred mode, make sure the state says
    "unsynced during this boot" (on disk) first. Free when it already does."""
    if _mode != DEFERRED:
        return
    root = Path(root)
    current = boot_id()
    state = read_state(root)
    if state is not None and state["boot"] == current and state["unsynced_since"] is not None:
        return
    with _locked(root):
        state = read_state(root)
        if unsynced_elsewhere(root, state):  # normally done when the Store was opened
            _recover_locked(root, state)  # type: ignore[arg-type]
            state = None
        if state is not None and state["boot"] == current and state["unsynced_since"] is not None:
            return
        _write_state(root, {"boot": current, "unsynced_since": time.time() - MARGIN_S})


def recover(root: Path) -> bool:
    """After a reboot with a window still open: forget what may be stale. Call before the stat
    cache is loaded. Returns whether anything was done. One small read when nothing is due."""
    root = Path(root)
    if not unsynced_elsewhere(root):
        return False
    with _locked(root):
        state = read_state(root)
        if not unsynced_elsewhere(root, state):  # another process recovered meanwhile
            return False
        _recover_locked(root, state)  # type: ignore[arg-type]
    return True


def _recover_locked(root: Path, state: dict[str, Any]) -> None:
    since_ns = int(float(state["unsynced_since"]) * 1e9)
    path = root / STAT_CACHE
    try:
        entries = json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError):
        entries = None  # absent or unreadable: the stat cache starts empty anyway
    if isinstance(entries, dict):
        kept = {k: v for k, v in entries.items() if _recorded_before(v, since_ns)}
        if len(kept) != len(entries):
            _write_durably(path, json.dumps(kept, sort_keys=True))
    elif entries is not None or path.exists():
        path.unlink(missing_ok=True)
        fsync_path(root)
    records = root / NOOP_RECORDS
    if records.is_dir():
        for p in records.iterdir():
            p.unlink(missing_ok=True)
        fsync_path(records)
    # Only once the above is on disk: a crash before this line recovers again next boot.
    _write_state(root, {"boot": boot_id(), "unsynced_since": None})


def _recorded_before(entry: Any, since_ns: int) -> bool:
    """A stat-cache entry ``[[size, mtime_ns, ctime_ns, inode, nlink], hash]`` for a file last
    written before the window opened (anything unexpected is dropped)."""
    try:
        return int(entry[0][1]) < since_ns
    except (TypeError, ValueError, IndexError, KeyError):
        return False


# -- fsync helpers ---------------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    """fsync a file or a folder by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, text: str) -> None:
    """Replace ``path`` atomically with ``text``, on disk before returning (file and folder)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)
