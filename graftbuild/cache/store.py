"""The cache folder: content-addressed objects, the action cache, traces and the build lock.

Layout (all under the cache root)::

    objects/ab/<hash>/      an artifact folder, named by its content hash, files read-only
    actions/ab/<key>.json   action cache: node key -> output hash (written after the object)
    traces/<recipe>.json    the last build's key parts per node, to explain staleness
    stat.json               the stat cache (see hashing.StatCache)
    tmp/                    step outputs being written; renamed into objects/ when complete
    lock                    an flock held by a running build
    durability.json         since when this boot's files may not be on disk (+ its flock file)

An object appears under ``objects/`` only by an atomic rename of a complete folder (see below)
that carries its manifest, and an action entry is written only after its object exists, so a
crash leaves at most garbage in ``tmp/`` (cleared by the next build), never a half-written object
that looks whole. An object is checked against its manifest every time a build uses it (cheaply,
through the stat cache: only files whose size, mtime or inode changed, or whose ctime changed
without their link count changing (an output folder linking or unlinking them), are re-read)
and a corrupt one is removed and rebuilt; ``graftbuild fsck`` re-reads everything.

Whether object data is fsynced before that rename depends on the durability mode: ``make``
defers it to the kernel by default (``--fsync``: immediate). After a crash or power cut that may
have lost deferred bytes, opening the store forgets the stat entries of every file written since
(graftbuild/durability.py), so the next use of such an object re-reads and re-checks it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from graftbuild.cache import durability
from graftbuild.cache.hashing import StatCache, file_kind, hash_file, hash_obj, iter_files
from graftbuild.cache.integrity import (
    MANIFEST,
    check_copy,
    check_object,
    read_manifest,
    write_manifest,
)
from graftbuild.errors import BuildError, UserError

MARKER = ".graftbuild.json"  # written into every materialised output folder


class Store:
    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.abspath(root))
        try:
            for sub in ("objects", "actions", "traces", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create cache folder {self.root}: {e.strerror}") from e
        durability.recover(self.root)  # after a reboot: before the stat cache is trusted
        self.stat_cache = StatCache.load(self.root / "stat.json")

    # -- objects -------------------------------------------------------------------------------

    def object_path(self, digest: str) -> Path:
        return self.root / "objects" / digest[:2] / digest

    def has_object(self, digest: str) -> bool:
        return self.object_path(digest).is_dir()

    @contextlib.contextmanager
    def staging(self, label: str) -> Iterator[Path]:
        """A fresh temporary folder for a step's output; removed afterwards unless committed."""
        durability.begin(self.root)  # deferred mode: record the window before writing
        tmp = Path(tempfile.mkdtemp(prefix=label.replace(":", "_") + ".", dir=self.root / "tmp"))
        out = tmp / "out"
        out.mkdir()
        try:
            yield out
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def commit(self, staged: Path) -> str:
        """Move a finished output folder into the object store; returns its content hash."""
        th = write_manifest(staged)
        digest = th.digest
        final = self.object_path(digest)
        if final.is_dir():  # the same bytes were built before (early cutoff at work)
            if self.verify(digest) is None:
                return digest
            self.discard(digest)  # a corrupt copy: ours replaces it
        for _, p in iter_files(staged, keep=lambda rel: True):
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staged, final)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):  # else: another build won the race
                raise
            return digest
        for rel, h in th.files.items():
            self.stat_cache.remember(final / rel, h)
        return digest

    def verify(self, digest: str, full: bool = False) -> str | None:
        """None if the object is intact, else what is wrong with it. The cheap check re-reads
        only files whose stat changed since they were last hashed; ``full`` re-reads all. A
        problem the cheap check finds is confirmed by a full one (the stat cache may be stale)."""
        obj = self.object_path(digest)
        if full:
            return check_object(obj, digest, hash_file)
        if check_object(obj, digest, self.stat_cache.object_file) is None:
            return None
        problem = check_object(obj, digest, hash_file)
        if problem is None:  # a wrong stat-cache entry, not a wrong object
            for rel, (_, h) in (read_manifest(obj) or {}).items():
                self.stat_cache.remember(obj / rel, h)
        return problem

    def discard(self, digest: str) -> None:
        """Remove a (corrupt) object: renamed out of ``objects/`` first, so it is never seen
        half-deleted."""
        self.discard_path(self.object_path(digest))

    def discard_path(self, obj: Path) -> None:
        """Remove one entry of ``objects/`` crash-safely: renamed into ``tmp/`` (cleared by the
        next build if this process dies) before anything in it is deleted."""
        trash = Path(tempfile.mkdtemp(prefix="discard.", dir=self.root / "tmp"))
        with contextlib.suppress(FileNotFoundError):
            os.rename(obj, trash / obj.name)
        shutil.rmtree(trash, ignore_errors=True)

    def clean_tmp(self) -> None:
        """Remove what interrupted builds left in ``tmp/`` (call while holding the lock)."""
        for p in (self.root / "tmp").iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        for pattern in (".*.tmp", "traces/.*.tmp", "actions/*/.*.tmp"):  # half-written JSON
            for p in self.root.glob(pattern):
                p.unlink(missing_ok=True)

    # -- action cache ----------------------------------------------------------------------------

    def _action_path(self, key: str) -> Path:
        return self.root / "actions" / key[:2] / f"{key}.json"

    def lookup(self, key: str) -> str | None:
        """The output hash recorded for a key, if its object is still present."""
        from graftbuild.cache.schemas import action_output, read_json

        digest = action_output(read_json(self._action_path(key)))  # malformed: absent
        if digest is None or not self.has_object(digest):
            return None
        return digest

    def record(self, key: str, digest: str, node_id: str) -> None:
        path = self._action_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps({"output": digest, "node": node_id, "time": time.time()}))

    # -- traces --------------------------------------------------------------------------------

    def _trace_path(self, recipe: Path) -> Path:
        return self.root / "traces" / f"{hash_obj(str(recipe))[:16]}.json"

    def load_traces(self, recipe: Path) -> dict[str, Any]:
        from graftbuild.cache.schemas import read_json, trace_nodes

        return trace_nodes(read_json(self._trace_path(recipe)))[0]  # malformed entries: absent

    def save_traces(self, recipe: Path, nodes: dict[str, Any]) -> None:
        payload = {"recipe": str(recipe), "nodes": nodes}
        atomic_write(self._trace_path(recipe), json.dumps(payload, sort_keys=True, indent=1))

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

    def output_problem(self, digest: str, dest: Path) -> str | None:
        """None if ``dest`` holds the (already verified) object unchanged, else why not."""
        dest = Path(os.path.abspath(dest))
        if not owned(dest):
            return "missing"
        try:
            current = json.loads((dest / MARKER).read_text()).get("object")
        except (OSError, ValueError, AttributeError):
            return f"its marker {MARKER} is damaged"
        if current != digest:
            return "holds an older build"
        obj = self.object_path(digest)
        if check_copy(obj, dest, self.stat_cache.file) is None:
            return None
        return check_copy(obj, dest, hash_file)  # confirmed by reading, not by the stat cache

    def materialize(
        self, digest: str, dest: Path, node_id: str, reason: str | None = None
    ) -> str | None:
        """Make ``dest`` a copy of an object (hardlinks where possible). Returns None if it
        already was one, else why it was (re)written.

        ``dest`` carries a marker naming the object; a folder already holding the object is left
        alone. A folder without our marker is never overwritten: it is the user's. The new copy
        is assembled beside ``dest`` and renamed into place; leftovers of an interrupted
        materialisation are removed first. ``reason`` forces a rewrite (``fsck --repair``).
        """
        dest = Path(os.path.abspath(dest))
        exists = owned(dest)  # a path that is not ours is refused before anything is touched
        why = reason or self.output_problem(digest, dest)
        if why is None:
            return None
        src = self.object_path(digest)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            for stale in dest.parent.glob(f".{glob.escape(dest.name)}.graftbuild-*"):
                if _is_real_dir(stale):  # only folders we set aside; a user's file stays
                    _remove_copy(stale)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.graftbuild-tmp-", dir=dest.parent))
            tmp.chmod(0o777 & ~_umask())
        except OSError as e:
            raise BuildError(f"cannot write output folder {dest}: {e.strerror or e}") from e
        copied: list[tuple[Path, str]] = []
        hashes = {rel: h for rel, (_, h) in (read_manifest(src) or {}).items()}
        try:
            for rel, p in iter_files(src, keep=lambda rel: rel != MANIFEST):
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(p, target)
                except OSError:  # another filesystem (rare): a copy, fsynced in any mode
                    _copy_durably(p, target)
                    if rel in hashes:
                        copied.append((dest / rel, hashes[rel]))
            atomic_write(tmp / MARKER, json.dumps({"object": digest, "node": node_id}))
            if exists:
                old = dest.with_name(f".{dest.name}.graftbuild-old-{os.getpid()}")
                os.rename(dest, old)
                os.rename(tmp, dest)
                _remove_copy(old)
            else:
                os.rename(tmp, dest)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise BuildError(f"cannot write output folder {dest}: {e.strerror or e}") from e
        # Linking changed the object files' ctime: record them (verified before this call) and
        # the copies as they are now, so the next build's check stays a stat.
        for rel, h in hashes.items():
            self.stat_cache.remember(src / rel, h)
        for path, h in copied:
            self.stat_cache.remember(path, h)
        return why


def owned(dest: Path) -> bool:
    """Whether ``dest`` is an output folder graftbuild wrote: False when nothing is there, True
    for a real folder (not a symlink) carrying our marker as a regular file, and a UserError
    naming the path for anything else (a user's file or folder, a symlink, a device node).

    The one test every operation that replaces or deletes an output path goes through
    (materialise, ``clean``): a path that is not ours is never moved, replaced or deleted."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        raise UserError(f"output path {dest}: a parent of it is a file, not a folder") from None
    if stat.S_ISLNK(st.st_mode):
        what = "a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        what = "a file" if stat.S_ISREG(st.st_mode) else file_kind(st.st_mode)
    else:
        try:
            if stat.S_ISREG(os.lstat(dest / MARKER).st_mode):
                return True
        except FileNotFoundError:
            pass
        what = "a folder"
    raise UserError(
        f"output path {dest} is {what} that was not written by graftbuild; "
        "move it away or choose another output path"
    )


def remove_output(dest: Path) -> bool:
    """Delete an output folder graftbuild wrote (``clean``); False when nothing is there. It is
    renamed aside first and its marker goes first, so a deletion cut short leaves a hidden
    leftover (cleared by the next materialisation), never a marked folder missing files. A path
    that is not ours is a UserError (``owned``), never touched."""
    dest = Path(os.path.abspath(dest))
    if not owned(dest):
        return False
    aside = dest.with_name(f".{dest.name}.graftbuild-old-{os.getpid()}")
    os.rename(dest, aside)
    _remove_copy(aside)
    return True


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _copy_durably(src: Path, dst: Path) -> None:
    """Copy a file into an output folder, fsynced in any durability mode (it lives outside the
    cache). Not ``copy2``: the copy's mtime must be now, the time its bytes were written, which
    crash recovery goes by (graftbuild/durability.py)."""
    shutil.copyfile(src, dst)
    shutil.copymode(src, dst)
    durability.fsync_path(dst)


def _remove_copy(folder: Path) -> None:
    """Delete a folder set aside by ``materialize``, its marker first: a deletion cut short (a
    killed build) then leaves loose files for the next build to clear, never a marked folder
    that claims to be a copy of its object but lacks some of its files."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        (folder / MARKER).unlink()
    shutil.rmtree(folder, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
