"""Content hashes (xxh3-128) of bytes, files and folders, and the stat cache that avoids re-reading.

A file's hash is reused without reading it while its (size, mtime_ns, ctime_ns, inode, link
count) are unchanged. ctime is part of the signature because tools that restore mtimes (rsync
-t, tar, ``touch -d``) would otherwise hide a change; ctime cannot be set from user space.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import xxhash

from graftbuild.cache.files import file_kind, open_regular
from graftbuild.errors import UserError

__all__ = ["file_kind", "open_regular"]  # re-exported: the one door for reading files

CHUNK = 1 << 20  # 1 MiB reads: the copy stays in cache for the hash (8 MiB ran ~1.5x slower here)


def hash_bytes(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def canonical_json(obj: Any) -> bytes:
    """A stable byte encoding of JSON-able data: sorted keys, no whitespace."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def hash_obj(obj: Any) -> str:
    return hash_bytes(canonical_json(obj))


PIPELINE_MIN = 64 << 20  # files at least this large are read and hashed on two threads


MAP_WINDOW = 32 << 20  # bytes of a large file mapped at a time


def hash_file(path: Path) -> str:
    """xxh3-128 of a file's bytes. A large file is hashed in place in the page cache, through
    read-only maps of ``MAP_WINDOW`` bytes that a second thread maps (and faults in) one ahead
    of the hashing (``_hash_mapped``): no copy into our memory, so a warm 3 GB file hashed in
    0.65 s against 1.24 s when read into a buffer (``cat``: 0.62 s); resident memory stays at two
    windows. Where a file cannot be mapped, it is read by a second thread while this one hashes
    what it has read (both release the GIL)."""
    with open(open_regular(path), "rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):  # a larger read-ahead for cold files
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        size = os.fstat(f.fileno()).st_size
        if size >= PIPELINE_MIN:
            mapped = _hash_mapped(f.fileno(), size)
            return mapped if mapped is not None else _hash_pipelined(f)
        h = xxhash.xxh3_128()
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
        return h.hexdigest()


def _hash_mapped(fd: int, size: int) -> str | None:
    """xxh3-128 of the first ``size`` bytes of ``fd``, hashed through read-only maps of
    ``MAP_WINDOW`` bytes; the next window is mapped and faulted in (``MAP_POPULATE``) by a
    second thread while this one hashes the current one, and each is unmapped once hashed.
    None where the first window cannot be mapped (the caller reads the file instead). As with
    any map (the fuse's inputs: docs/PERFORMANCE.md), a file truncated while it is hashed
    faults (SIGBUS) instead of failing with a message."""
    import mmap
    import queue
    import threading

    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)

    def window(lo: int) -> mmap.mmap:
        return mmap.mmap(
            fd, min(MAP_WINDOW, size - lo), flags=flags, prot=mmap.PROT_READ, offset=lo
        )

    try:
        first = window(0)
    except (OSError, ValueError):
        return None
    ready: queue.Queue[mmap.mmap | BaseException | None] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def mapper() -> None:
        try:
            for lo in range(MAP_WINDOW, size, MAP_WINDOW):
                if stop.is_set():
                    return
                ready.put(window(lo))
        except BaseException as e:  # handed to the hashing thread, which raises it
            ready.put(e)
        ready.put(None)

    thread = threading.Thread(target=mapper, name="graftbuild-hash-map", daemon=True)
    thread.start()
    h = xxhash.xxh3_128()
    item: mmap.mmap | BaseException | None = first
    try:
        while item is not None:
            if isinstance(item, BaseException):
                raise item
            with item:
                h.update(item)
            item = ready.get()
    finally:
        stop.set()
        while thread.is_alive():  # unblock the mapper and unmap what it mapped ahead
            with contextlib.suppress(queue.Empty):
                left = ready.get(timeout=0.05)
                if isinstance(left, mmap.mmap):
                    left.close()
        thread.join()
    return h.hexdigest()


def _hash_pipelined(f: Any, buffers: int = 4) -> str:
    """Hash ``f`` from its position to its end, reading ahead on a second thread."""
    import queue
    import threading

    full: queue.Queue[tuple[bytearray, int] | BaseException] = queue.Queue()
    free: queue.Queue[bytearray | None] = queue.Queue()
    for _ in range(buffers):
        free.put(bytearray(CHUNK))

    def read() -> None:
        try:
            while (buf := free.get()) is not None:
                n = f.readinto(buf)
                full.put((buf, n))
                if not n:
                    return
        except BaseException as e:  # handed to the hashing thread, which raises it
            full.put(e)

    reader = threading.Thread(target=read, name="graftbuild-hash-read", daemon=True)
    reader.start()
    h = xxhash.xxh3_128()
    try:
        while True:
            item = full.get()
            if isinstance(item, BaseException):
                raise item
            buf, n = item
            if not n:
                break
            h.update(memoryview(buf)[:n])
            free.put(buf)
    finally:
        free.put(None)  # stops the reader if this thread stopped first
        reader.join()
    return h.hexdigest()


def _signature(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_nlink]


def signature(path: str | Path) -> list[int]:
    """(size, mtime_ns, ctime_ns, inode, link count) of a file or folder: what the stat cache
    trusts."""
    return _signature(os.stat(path))


OBJECT_META = (".graftbuild-object.json", ".graftbuild.json")
"""Our own marker files: the only files of an object or output folder outside its hash."""


def is_object_file(rel: str) -> bool:
    """Which files of a cache object count towards its content hash: every file but our own
    markers. Hidden files and markdown are copied into outputs like any other, so they must be
    covered (a changed model card or an injected dotfile is a different object)."""
    return rel not in OBJECT_META


def is_tracked(rel: str) -> bool:
    """Which files of a folder count towards its content hash.

    Hidden files (our own markers among them) and markdown (model cards, READMEs) do not change
    what a model computes, so they are left out.
    """
    parts = rel.split("/")
    return not any(p.startswith(".") for p in parts) and not rel.endswith(".md")


def iter_files(
    root: Path,
    keep: Callable[[str], bool] = is_tracked,
    on_dir: Callable[[str], None] | None = None,
) -> Iterator[tuple[str, Path]]:
    """(relative posix path, path) of the regular files under ``root``, sorted, filtered.

    ``on_dir`` is called with every folder walked (the no-op record watches them: a file added
    to a folder changes the folder's mtime). Hidden folders are walked only when ``keep``
    accepts a hidden name (objects: ``is_object_file``)."""
    out: list[tuple[str, Path]] = []
    walk_hidden = keep(".x/y")
    for dirpath, dirnames, filenames in os.walk(root):
        if on_dir is not None:
            on_dir(dirpath)
        dirnames[:] = sorted(d for d in dirnames if walk_hidden or not d.startswith("."))
        for name in filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if not keep(rel):
                continue
            try:
                mode = os.stat(p).st_mode
            except FileNotFoundError:  # a dangling link: nothing to read
                continue
            if stat.S_ISREG(mode):
                out.append((rel, p))
            elif not stat.S_ISDIR(mode):  # never opened: reading a FIFO would block
                raise UserError(
                    f"{p}: expected a regular file, found {file_kind(mode)}; "
                    "graftbuild reads only regular files"
                )
    return iter(sorted(out))


class TreeHash(NamedTuple):
    """A folder's hash and the per-file hashes it was made of (for saying what changed)."""

    digest: str
    files: dict[str, str]


def combine(files: dict[str, str]) -> str:
    return hash_obj(sorted(files.items()))


class StatCache:
    """Maps an absolute path to (stat signature, hash); persisted as JSON in the cache folder.

    ``hashed`` lists the files actually read during this process: tests use it to show that a
    no-op build reads no weight file. ``seen`` maps every file and folder looked at to the stat
    signature its hash was taken under (graftbuild/noop.py records them for the next run).
    (A plain class, not a dataclass: the no-op fast path imports this module, and importing
    ``dataclasses`` alone cost it ~15 ms.)
    """

    def __init__(self, path: Path | None = None, entries: dict[str, list[Any]] | None = None):
        self.path = path
        self.entries: dict[str, list[Any]] = entries if entries is not None else {}
        self.hashed: list[Path] = []
        self.seen: dict[str, list[int]] = {}
        self.dirty = False
        self.dropped = 0
        """Malformed entries found (and left out) when loading."""

    @classmethod
    def load(cls, path: Path) -> StatCache:
        """The stat cache saved at ``path``; malformed entries are dropped (cache/schemas.py)."""
        from graftbuild.cache.schemas import read_json, stat_entries

        entries, dropped = stat_entries(read_json(path))
        cache = cls(path=path, entries=entries)
        cache.dropped = dropped
        cache.dirty = bool(dropped)  # saved without them
        return cache

    def file(self, path: Path) -> str:
        path = Path(os.path.abspath(path))
        st = path.stat()
        sig = _signature(st)
        key = str(path)
        self.seen[key] = sig
        hit = self.entries.get(key)
        if hit is not None and hit[0] == sig:
            _KNOWN[key] = (sig, hit[1])
            return hit[1]
        digest = hash_file(path)
        self.hashed.append(path)
        self.entries[key] = [sig, digest]
        _KNOWN[key] = (sig, digest)
        self.dirty = True
        return digest

    def object_file(self, path: Path) -> str:
        """``file`` for a file inside a cache object: a change of ctime alone is trusted.

        Object files are read-only and written only by graftbuild; their ctime changes whenever
        an output folder hardlinked to them is created or deleted (the link count is inode
        metadata), which says nothing about their bytes. Size, mtime and inode must still match;
        ``graftbuild fsck`` reads everything regardless."""
        path = Path(os.path.abspath(path))
        hit = self.entries.get(str(path))
        if hit is not None:
            sig = _signature(path.stat())
            old = hit[0]
            # A ctime change is trusted only together with a link-count change (an output
            # linked or unlinked); a ctime that moved alone is a write, chmod or utime on the
            # object file itself (an in-place flip with its mtime restored): re-read.
            if old == sig or (
                len(old) == 5
                and [old[0], old[1], old[3]] == [sig[0], sig[1], sig[3]]
                and old[4] != sig[4]
            ):
                self.seen[str(path)] = sig
                if old != sig:
                    self.entries[str(path)] = [sig, hit[1]]
                    self.dirty = True
                return str(hit[1])
        return self.file(path)

    def remember(self, path: Path, digest: str) -> None:
        """Record ``digest`` as the hash of ``path`` as it is now, without reading it (for files
        this process has just written or verified)."""
        path = Path(os.path.abspath(path))
        self.entries[str(path)] = [_signature(path.stat()), digest]
        self.dirty = True

    def tree(self, root: Path, keep: Callable[[str], bool] = is_tracked) -> TreeHash:
        files = {rel: self.file(p) for rel, p in iter_files(root, keep, self._saw_dir)}
        return TreeHash(combine(files), files)

    def _saw_dir(self, folder: str) -> None:
        path = os.path.abspath(folder)
        self.seen[path] = signature(path)

    def input_hash(self, path: Path) -> TreeHash:
        """Hash of a declared input: a single file or a folder."""
        if path.is_dir():
            return self.tree(path)
        digest = self.file(path)
        return TreeHash(digest, {path.name: digest})

    def save(self) -> None:
        """Write the cache; a failure (a full disk) is ignored: the cache is only a shortcut."""
        if self.path is None or not self.dirty:
            return
        with contextlib.suppress(OSError):
            self._save(self.path)

    def _save(self, target: Path) -> None:
        # Merge with what another process may have written since we loaded.
        from graftbuild.cache.schemas import read_json, stat_entries

        on_disk, _ = stat_entries(read_json(target))
        on_disk.update(self.entries)
        self.entries = on_disk
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.entries, sort_keys=True))
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        self.dirty = False


def tree_hash_uncached(
    root: Path,
    hasher: Callable[[Path], str] = hash_file,
    keep: Callable[[str], bool] = is_object_file,
) -> TreeHash:
    """Hash of an object folder read in full (for objects freshly written by a step; ``hasher=
    hash_written`` takes the hashes their writers recorded instead of reading those files).
    Every file but our markers counts (``is_object_file``)."""
    files = {rel: hasher(p) for rel, p in iter_files(root, keep)}
    return TreeHash(combine(files), files)


# Files whose hash a stat cache of this process took or confirmed: absolute path -> (stat
# signature, hash). A step that needs an input file's hash (a reference pack names its source's
# weight files) gets it from here when the file has not changed since, instead of reading it.
_KNOWN: dict[str, tuple[list[int], str]] = {}


def hash_known(path: Path) -> str:
    """The hash of ``path``: as this process's stat cache took it when the file's signature
    (size, mtime, ctime, inode) is still the one it was taken under, else read."""
    key = os.path.abspath(path)
    hit = _KNOWN.get(key)
    if hit is not None and hit[0] == signature(key):
        return hit[1]
    return hash_file(Path(key))


# Files this process wrote in one sequential pass, hashing exactly the bytes it wrote
# (graftbuild/writing.py): absolute path -> (stat signature after the write, hash).
_WRITTEN: dict[str, tuple[list[int], str]] = {}


def note_written(path: str | Path, digest: str) -> None:
    """Record ``digest`` as the hash of a file this process has just finished writing (and
    hashed while writing), so committing it to the store need not read it back."""
    key = os.path.abspath(path)
    _WRITTEN[key] = (signature(key), digest)


def hash_written(path: Path) -> str:
    """The hash its writer recorded for ``path`` if the file is as the writer left it (same
    size, mtime, ctime, inode: the stat cache's test), else the hash of its bytes, read."""
    key = os.path.abspath(path)
    hit = _WRITTEN.pop(key, None)
    if hit is not None and hit[0] == signature(key):
        return hit[1]
    return hash_file(Path(key))
