"""Checking that an object, or a folder materialised from one, still holds the bytes it was
named for.

Every object carries a manifest (``.graftbuild-object.json``, hidden, so not part of its hash)
listing each tracked file's size and hash; it is written into the staging folder before the
rename, so it is as atomic as the object itself. A check takes a ``hasher``: the stat cache's
``file`` for the cheap check ``make`` runs on every use (a file whose size, mtime, ctime and inode
are unchanged keeps its recorded hash; anything else is re-read), or ``hash_file`` for the full
check of ``graftbuild fsck``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from graftbuild.cache import durability
from graftbuild.cache.hashing import (
    OBJECT_META,
    TreeHash,
    combine,
    hash_written,
    is_object_file,
    iter_files,
    tree_hash_uncached,
)

MANIFEST = OBJECT_META[0]

Hasher = Callable[[Path], str]


def write_manifest(folder: Path) -> TreeHash:
    """Hash a freshly written folder and record its manifest in it. In immediate mode it fsyncs
    every file and the folder, so an object that survives a power cut is whole (deferred mode:
    graftbuild/durability.py re-checks objects after a crash instead). A file whose writer
    hashed it while writing it (``hashing.note_written``) and that is unchanged since is not read
    again."""
    th = tree_hash_uncached(folder, hash_written)
    files = {rel: [(folder / rel).stat().st_size, h] for rel, h in th.files.items()}
    (folder / MANIFEST).write_text(json.dumps({"version": 1, "files": files}, sort_keys=True))
    if durability.fsync_objects():
        for _, p in iter_files(folder, keep=lambda rel: True):
            durability.fsync_path(p)
        durability.fsync_path(folder)
    return th


def read_manifest(obj: Path) -> dict[str, tuple[int, str]] | None:
    """rel path -> (size, hash); None when the object has no readable manifest."""
    try:
        data = json.loads((obj / MANIFEST).read_text())
        return {rel: (int(size), str(h)) for rel, (size, h) in data["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def check_object(obj: Path, digest: str, hasher: Hasher) -> str | None:
    """None if the object folder holds exactly the bytes named by ``digest``, else what is wrong
    (naming the file)."""
    if not obj.is_dir():
        return "missing"
    odd = not_regular(obj)
    if odd is not None:
        return f"{odd}: not a regular file"
    files = dict(iter_files(obj, is_object_file))
    manifest = read_manifest(obj)
    if manifest is None:  # no manifest: only the folder's hash as a whole can be checked
        hashes = {rel: hasher(p) for rel, p in files.items()}
        return None if combine(hashes) == digest else "content does not match its hash"
    missing = sorted(set(manifest) - set(files))
    if missing:
        return f"{missing[0]}: missing"
    extra = sorted(set(files) - set(manifest))
    if extra:
        return f"{extra[0]}: not part of the object"
    for rel, (size, h) in sorted(manifest.items()):
        p = files[rel]
        if p.stat().st_size != size:
            return f"{rel}: size {p.stat().st_size} bytes, expected {size}"
        if hasher(p) != h:
            return f"{rel}: content changed (hash mismatch)"
    if combine({rel: h for rel, (_, h) in manifest.items()}) != digest:
        return "manifest does not match the object's hash"
    return None


def check_copy(obj: Path, dest: Path, hasher: Hasher) -> str | None:
    """None if ``dest`` holds every file of the (already checked) object ``obj`` unchanged.

    A file hardlinked to the object's own is its bytes; any other is hashed through ``hasher``.
    """
    manifest = read_manifest(obj)
    if manifest is None:
        manifest = {
            rel: (p.stat().st_size, hasher(p)) for rel, p in iter_files(obj, is_object_file)
        }
    for rel, (size, h) in sorted(manifest.items()):
        try:
            st = (dest / rel).stat()
        except (FileNotFoundError, NotADirectoryError):
            return f"{rel}: missing"
        if st.st_size != size:
            return f"{rel}: changed (size)"
        src = (obj / rel).stat()
        if (st.st_dev, st.st_ino) == (src.st_dev, src.st_ino):
            continue
        if hasher(dest / rel) != h:
            return f"{rel}: changed (hash mismatch)"
    return None


def not_regular(obj: Path) -> str | None:
    """The first entry of an object that is neither a folder nor a regular file (a symlink, a
    FIFO, a device): objects hold only files graftbuild wrote, so such an entry is damage or an
    injection (an archive from a remote cache), never part of the object."""
    import os
    import stat

    for dirpath, dirnames, filenames in os.walk(obj):
        for name in sorted(filenames) + sorted(dirnames):
            path = os.path.join(dirpath, name)
            mode = os.lstat(path).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                return os.path.relpath(path, obj)
    return None
