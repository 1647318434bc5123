"""The cache folder: content-addressed objects, the action cache, traces and the build lock.

Layout (all under the cache root)::

    objects/ab/<hash>/      an artifact folder, named by its content hash, files read-only
    actions/ab/<key>.json   action cache: node key -> output hash (written after the object)
    traces/<recipe>.json    the last build's key parts per node, to explain staleness
    stat.json               the stat cache (see hashing.StatCache)
    tmp/                    step outputs being written; renamed into objects/ when complete
    lock                    an flock held by a running build

An object appears under ``objects/`` only by an atomic rename of a complete folder, and an
action entry is written only after its object exists, so a crash leaves at most garbage in
``tmp/``, never a half-written object that looks whole.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from graftbuild.errors import BuildError, UserError
from graftbuild.hashing import StatCache, hash_obj, iter_files, tree_hash_uncached

MARKER = ".graftbuild.json"  # written into every materialised output folder


class Store:
    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.abspath(root))
        try:
            for sub in ("objects", "actions", "traces", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create cache folder {self.root}: {e.strerror}") from e
        self.stat_cache = StatCache.load(self.root / "stat.json")

    # -- objects -------------------------------------------------------------------------------

    def object_path(self, digest: str) -> Path:
        return self.root / "objects" / digest[:2] / digest

    def has_object(self, digest: str) -> bool:
        return self.object_path(digest).is_dir()

    @contextlib.contextmanager
    def staging(self, label: str) -> Iterator[Path]:
        """A fresh temporary folder for a step's output; removed afterwards unless committed."""
        tmp = Path(tempfile.mkdtemp(prefix=label.replace(":", "_") + ".", dir=self.root / "tmp"))
        out = tmp / "out"
        out.mkdir()
        try:
            yield out
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def commit(self, staged: Path) -> str:
        """Move a finished output folder into the object store; returns its content hash."""
        digest = tree_hash_uncached(staged).digest
        final = self.object_path(digest)
        if final.is_dir():  # the same bytes were built before (early cutoff at work)
            return digest
        for _, p in iter_files(staged, keep=lambda rel: True):
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staged, final)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):  # else: another build won the race
                raise
        return digest

    # -- action cache ----------------------------------------------------------------------------

    def _action_path(self, key: str) -> Path:
        return self.root / "actions" / key[:2] / f"{key}.json"

    def lookup(self, key: str) -> str | None:
        """The output hash recorded for a key, if its object is still present."""
        try:
            entry = json.loads(self._action_path(key).read_text())
        except (FileNotFoundError, ValueError):
            return None
        digest = entry.get("output")
        if not isinstance(digest, str) or not self.has_object(digest):
            return None
        return digest

    def record(self, key: str, digest: str, node_id: str) -> None:
        path = self._action_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, json.dumps({"output": digest, "node": node_id, "time": time.time()}))

    # -- traces --------------------------------------------------------------------------------

    def _trace_path(self, recipe: Path) -> Path:
        return self.root / "traces" / f"{hash_obj(str(recipe))[:16]}.json"

    def load_traces(self, recipe: Path) -> dict[str, Any]:
        try:
            data = json.loads(self._trace_path(recipe).read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return data.get("nodes", {}) if isinstance(data, dict) else {}

    def save_traces(self, recipe: Path, nodes: dict[str, Any]) -> None:
        payload = {"recipe": str(recipe), "nodes": nodes}
        _atomic_write(self._trace_path(recipe), json.dumps(payload, sort_keys=True, indent=1))

    # -- locking ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, on_wait: Any = None) -> Iterator[None]:
        """Hold the cache's build lock; calls ``on_wait(pid)`` once if another build holds it."""
        path = self.root / "lock"
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    f.seek(0)
                    on_wait(f.read().strip() or "?")
                fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            try:
                yield
            finally:
                f.seek(0)
                f.truncate()
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- materialisation -----------------------------------------------------------------------

    def materialize(self, digest: str, dest: Path, node_id: str) -> bool:
        """Make ``dest`` a copy of an object (hardlinks where possible). Returns True if written.

        ``dest`` carries a marker naming the object; a folder already holding the object is left
        alone. A folder without our marker is never overwritten: it is the user's.
        """
        dest = Path(os.path.abspath(dest))
        marker = dest / MARKER
        if dest.exists():
            try:
                current = json.loads(marker.read_text()).get("object")
            except (FileNotFoundError, ValueError, AttributeError):
                raise UserError(
                    f"output folder {dest} exists and was not written by graftbuild; "
                    "move it away or choose another output path"
                ) from None
            if current == digest and _complete(self.object_path(digest), dest):
                return False
        src = self.object_path(digest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        tmp.chmod(0o777 & ~_umask())
        try:
            for rel, p in iter_files(src, keep=lambda rel: True):
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(p, target)
                except OSError:
                    shutil.copy2(p, target)
            _atomic_write(tmp / MARKER, json.dumps({"object": digest, "node": node_id}))
            if dest.exists():
                old = dest.with_name(f".{dest.name}.old.{os.getpid()}")
                os.rename(dest, old)
                os.rename(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, dest)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise BuildError(f"cannot write output folder {dest}: {e.strerror or e}") from e
        return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _complete(src: Path, dest: Path) -> bool:
    """Every file of the object is present in dest with the same size (cheap: stats only)."""
    for rel, p in iter_files(src, keep=lambda rel: True):
        try:
            if (dest / rel).stat().st_size != p.stat().st_size:
                return False
        except FileNotFoundError:
            return False
    return True


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
