"""A shared remote cache on any fsspec URL (``s3://bucket/prefix``, ``gs://...``, ``file:///...``).

Layout under the URL, mirroring the local store::

    objects/ab/<hash>.tar    one uncompressed tar per object folder (weights do not compress)
    actions/ab/<key>.json    action cache: node key -> output hash, written after the object

Publishing is atomic: an archive is written to a local temporary file first and then uploaded
under its final name in one operation (a single PUT, or a multipart upload that S3 and GCS only
make visible when complete); on filesystems where a partially written file is visible (``file``,
``sftp``, ...) it is uploaded under a temporary name and renamed. The action entry is written
last, so a reader that sees an entry also sees a whole archive, unless somebody wrote around us.
That is why every download is verified anyway: the archive is extracted into the local store's
``tmp/``, its content hash computed, and only a folder whose hash is the one its name claims is
committed. A bad object is reported, never used, and overwritten by the next push.

The filesystem is created on first use only, so a build whose nodes are all in the local cache
never imports the fsspec backend nor contacts the remote. Credentials come from the backend's
own configuration (for S3: environment, ``~/.aws``, instance roles; fsspec's config files),
never from the recipe.
"""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from graftbuild.cache.hashing import iter_files, tree_hash_uncached
from graftbuild.cache.integrity import not_regular
from graftbuild.cache.store import Store
from graftbuild.errors import BuildError, UserError

# Backends whose uploads become visible only when complete: publish under the final name.
ATOMIC_PUT = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"}


def check_url(url: str, where: str = "project.remote") -> str:
    """Refuse a remote URL that carries credentials: those belong in the backend's config."""
    parts = urlsplit(url)
    if parts.password is not None or (parts.username and parts.scheme not in ("", "file")):
        raise UserError(
            f"{where}: the remote URL must not contain credentials ({parts.scheme}://USER@...); "
            "configure them the usual way for the backend (for S3: AWS_* variables, ~/.aws, "
            "or fsspec's config)"
        )
    return url


class Remote:
    """One remote cache. Methods that the engine calls never raise on a remote failure when
    ``strict`` is False: they report it through ``log`` and the build goes on locally."""

    def __init__(
        self,
        url: str,
        log: Callable[[str], None] | None = None,
        strict: bool = False,
        pull: bool = True,
        push: bool = True,
    ) -> None:
        self.url = check_url(url).rstrip("/")
        self.pull = pull
        """Whether make asks the remote on a local miss."""
        self.push = push
        """Whether make uploads what it builds."""
        self.log = log or (lambda msg: None)
        self.strict = strict
        self._fs: Any = None
        self._root = ""
        self.bad: set[str] = set()
        """Objects found corrupt this session: pushed again even though a file exists."""
        self.stats = {"pulled": 0, "pushed": 0, "bad": 0}

    # -- plumbing ------------------------------------------------------------------------------

    @property
    def fs(self) -> Any:
        if self._fs is None:
            try:
                from fsspec.core import url_to_fs
            except ImportError:
                raise UserError(
                    "a remote cache needs fsspec (pip install 'graftbuild[remote]')"
                ) from None
            try:
                self._fs, self._root = url_to_fs(self.url)
            except ImportError as e:
                raise UserError(
                    f"remote {self.url}: the fsspec backend is not installed ({e}); for S3: "
                    "pip install 'graftbuild[remote]'"
                ) from None
            except ValueError as e:
                raise UserError(f"remote {self.url}: {e}") from None
            self._root = self._root.rstrip("/")
        return self._fs

    def _path(self, *parts: str) -> str:
        self.fs  # noqa: B018  (sets _root)
        return "/".join([self._root, *parts])

    def object_path(self, digest: str) -> str:
        return self._path("objects", digest[:2], f"{digest}.tar")

    def action_path(self, key: str) -> str:
        return self._path("actions", key[:2], f"{key}.json")

    def _atomic_put(self, local: Path, final: str) -> None:
        fs = self.fs
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        parent = final.rsplit("/", 1)[0]
        if protocol in ATOMIC_PUT:
            fs.put_file(str(local), final)
            return
        fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.{final.rsplit('/', 1)[1]}.{uuid.uuid4().hex}.tmp"
        try:
            fs.put_file(str(local), tmp)
            fs.mv(tmp, final)
        except BaseException:
            with contextlib.suppress(Exception):
                fs.rm_file(tmp)
            raise

    def _fail(self, what: str, e: Exception) -> None:
        msg = f"remote {self.url}: {what}: {type(e).__name__}: {e}"
        if self.strict:
            raise BuildError(msg) from e
        self.log(f"[yellow]warning:[/] {msg} (going on without the remote)")

    # -- pull ----------------------------------------------------------------------------------

    def lookup(self, key: str) -> str | None:
        """The output hash the remote's action cache holds for ``key`` (None: none)."""
        try:
            entry = json.loads(self.fs.cat_file(self.action_path(key)))
        except FileNotFoundError:
            return None
        except (UserError, BuildError):
            raise
        except Exception as e:
            self._fail(f"look up {key}", e)
            return None
        digest = entry.get("output") if isinstance(entry, dict) else None
        return digest if isinstance(digest, str) and len(digest) == 32 else None

    def fetch(self, key: str, store: Store, node_id: str) -> str | None:
        """The output of ``key`` from the remote into the local store; None on a miss.

        A hit is recorded in the local action cache, so the next build does not ask again.
        """
        try:
            try:
                entry = json.loads(self.fs.cat_file(self.action_path(key)))
            except FileNotFoundError:
                return None
            digest = entry.get("output") if isinstance(entry, dict) else None
            if not isinstance(digest, str) or len(digest) != 32:
                self.log(f"[yellow]warning:[/] remote action entry for {node_id} is malformed")
                return None
            if not store.has_object(digest) and not self.download(digest, store, node_id):
                return None
        except (UserError, BuildError):
            raise
        except Exception as e:
            self._fail(f"pull {node_id}", e)
            return None
        store.record(key, digest, node_id)
        self.stats["pulled"] += 1
        return digest

    def download(self, digest: str, store: Store, node_id: str) -> bool:
        """Fetch and verify one object into the local store; False if missing or bad."""
        with store.staging(f"pull.{node_id}") as out:
            try:
                with (
                    self.fs.open(self.object_path(digest), "rb") as f,
                    tarfile.open(fileobj=f, mode="r|") as tar,
                ):
                    tar.extractall(out, filter="data")
            except FileNotFoundError:
                return False
            except (tarfile.TarError, EOFError, OSError) as e:
                # OSError covers a truncated stream; a network error is one too and is treated
                # the same way: this object is not usable now.
                return self._reject(digest, node_id, f"unreadable archive ({e})")
            odd = not_regular(out)
            if odd is not None:
                return self._reject(digest, node_id, f"{odd} is not a regular file")
            actual = tree_hash_uncached(out).digest
            if actual != digest:
                return self._reject(digest, node_id, f"content hash is {actual}")
            store.commit(out)  # hashes it again: the store trusts nothing it did not hash
        return True

    def _reject(self, digest: str, node_id: str, why: str) -> bool:
        self.bad.add(digest)
        self.stats["bad"] += 1
        self.log(
            f"[yellow]warning:[/] remote object {digest} for {node_id} is corrupt or incomplete "
            f"({why}); not used, building it here"
        )
        return False

    # -- push ----------------------------------------------------------------------------------

    def push_node(self, key: str, digest: str, store: Store, node_id: str) -> bool:
        """Publish an object (if the remote lacks it) and then its action entry."""
        try:
            final = self.object_path(digest)
            if digest in self.bad or not self.fs.exists(final):
                self._upload(digest, store, final)
            entry = {"output": digest, "node": node_id, "time": time.time()}
            tmp = store.root / "tmp" / f"action.{key}.{os.getpid()}.json"
            tmp.write_text(json.dumps(entry))
            try:
                self._atomic_put(tmp, self.action_path(key))
            finally:
                tmp.unlink(missing_ok=True)
        except (UserError, BuildError):
            raise
        except Exception as e:
            self._fail(f"push {node_id}", e)
            return False
        self.bad.discard(digest)
        self.stats["pushed"] += 1
        return True

    def upload_object(self, digest: str, store: Store) -> None:
        """Publish one object unless the remote has it (workers do this; the driver then
        writes the action entry)."""
        final = self.object_path(digest)
        if not self.fs.exists(final):
            self._upload(digest, store, final)

    def _upload(self, digest: str, store: Store, final: str) -> None:
        src = store.object_path(digest)
        fd, name = tempfile.mkstemp(prefix=f"push.{digest}.", suffix=".tar", dir=store.root / "tmp")
        os.close(fd)
        archive = Path(name)
        try:
            with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
                for rel, p in iter_files(src, keep=lambda rel: True):
                    info = tar.gettarinfo(str(p), arcname=rel)
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    info.mode = 0o444
                    with open(p, "rb") as f:
                        tar.addfile(info, f)
            self._atomic_put(archive, final)
        finally:
            archive.unlink(missing_ok=True)
