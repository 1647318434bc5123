"""Reading SkillPack files: ``PackReader`` decodes one tensor at a time.

A pack is either *stored* (format 1.x: every tensor's encoded delta is in the file) or a
*reference* (format 2.x: a lossless pack that names its source's weights by content hash and
stores no payload; each delta is computed when read, as ``source - base`` in float32, exactly the
values the ``exact`` codec would have stored). Both answer the same questions, so a fusion
strategy need not know which it has:

- ``decode(name)``: the float32 delta;
- ``source_tensor(name)``: the fine-tuned tensor itself (read from the source for a reference
  pack; base + delta for a stored one; both need the base folder).

A reference pack needs its source and base model folders (``PackReader(path, base=...,
source=...)`` or ``attach``); a build passes them (the engine hands a node that reads a pack the
pack's own source as ``ROLE.source``).
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

from graftbuild.compress.codecs import get_codec
from graftbuild.errors import UserError
from graftbuild.skillpack.format import (
    ADDED_ROWS,
    FORMAT_VERSION,
    LEGACY_MAJOR,
    METADATA_KEY,
    READABLE_MAJORS,
    REFERENCE_MAJOR,
    parse_version,
    part_key,
    run_offsets,
    stored_layout,
)
from graftbuild.weights.tensors import ST_ITEMSIZE, ModelWeights, TensorFile, all_finite

DELTA_CHUNK = 1 << 18
"""Entries per piece of a reference pack's delta in ``delta_chunks`` (1 MiB of float32: a
piece is still in the CPU's cache when the fuse adds it)."""

if TYPE_CHECKING:
    import torch

    from graftbuild.weights.placement import Placement


class PackReader:
    """Reads a SkillPack lazily: metadata at open, each tensor's parts only when decoded."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        base: str | os.PathLike[str] | None = None,
        source: str | os.PathLike[str] | None = None,
    ) -> None:
        """``base`` and ``source``: the model folders a reference pack's deltas are computed
        from (ignored by a stored pack, except ``base`` for ``source_tensor``)."""
        self.path = Path(path)
        self._base: ModelWeights | None = None
        self._source: ModelWeights | None = None
        self._folders: dict[str, Path | None] = {"base": None, "source": None}
        self._opening = threading.Lock()  # -j workers may ask for the same folder at once
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such SkillPack file")
        try:
            self._f: Any = safe_open(str(self.path), framework="pt")
        except Exception as exc:  # safetensors raises its own error type for a bad header
            raise UserError(f"{self.path}: not a readable safetensors file ({exc})") from exc
        self._raw: TensorFile | None = None
        try:
            self._load_metadata()
            # Parts are read with pread, not through safe_open's memory map: a pack as large as
            # the model would otherwise count, page by page, as this process's memory.
            self._raw = TensorFile(self.path)
            self.attach(base, source)
        except BaseException:
            self.close()
            raise

    def _load_metadata(self) -> None:
        raw = (self._f.metadata() or {}).get(METADATA_KEY)
        if raw is None:
            raise UserError(f"{self.path}: not a SkillPack (no {METADATA_KEY!r} metadata)")
        try:
            doc = json.loads(raw)
            version = doc["format_version"]
            header = doc.get("header") or {}
            entries = doc.get("tensors") or {}
            if not isinstance(header, dict) or not isinstance(entries, dict):
                raise TypeError("'header' and 'tensors' must be objects")
            if not all(isinstance(e, dict) for e in entries.values()):
                raise TypeError("every tensor entry must be an object")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{self.path}: corrupt SkillPack metadata ({exc})") from exc
        major, _minor = parse_version(self.path, version)
        if major not in READABLE_MAJORS:
            raise UserError(
                f"{self.path}: SkillPack format version {version} is not supported "
                f"(this graftbuild reads {', '.join(f'{m}.x' for m in READABLE_MAJORS)}, "
                f"writes {FORMAT_VERSION})"
            )
        reference = header.get("reference") if major == REFERENCE_MAJOR else None
        if major == REFERENCE_MAJOR:
            ok = isinstance(reference, dict) and isinstance(reference.get("source"), str)
            stored = [n for n, e in entries.items() if e.get("parts") or e.get("codec") != "exact"]
            if not ok or stored:
                raise UserError(
                    f"{self.path}: corrupt reference SkillPack (a 2.x pack names its source in "
                    "header.reference and stores no parts; every entry is exact)"
                )
        self._reference: dict[str, Any] | None = reference
        self._legacy = major == LEGACY_MAJOR
        keys = set(self._f.keys())
        if self._legacy:
            for name, entry in entries.items():
                missing = [p for p in entry.get("parts", []) if part_key(name, p) not in keys]
                if missing:
                    raise UserError(f"{self.path}: tensor {name!r} lacks parts {missing}")
        elif reference is None:
            self._check_runs(entries, keys)
        self._format_version: str = version
        self._header: dict[str, Any] = header
        self._entries: dict[str, dict[str, Any]] = entries

    def _check_runs(self, entries: dict[str, dict[str, Any]], keys: set[str]) -> None:
        """A 3.x pack: each tensor's byte run has the length its metadata implies, and every
        stored run belongs to a tensor. Entries get ``parts`` (their part names, as 1.x listed
        them) for callers. A tensor whose codec this graftbuild does not know is checked when
        decoded (an error then; the rest of the pack stays readable)."""
        slices = {k: self._f.get_slice(k) for k in keys}
        stray = sorted(k for k in keys if k not in entries or slices[k].get_dtype() != "U8")
        if stray:
            raise UserError(
                f"{self.path}: stored entries {stray[:5]} are not the U8 byte run of a tensor"
            )
        sizes = {k: sl.get_shape() for k, sl in slices.items()}
        for name, entry in entries.items():
            try:
                layout = stored_layout(entry)
            except ValueError:  # an unknown codec
                continue
            except (KeyError, TypeError) as exc:
                raise UserError(f"{self.path}: tensor {name!r}: corrupt entry ({exc})") from exc
            nbytes = run_offsets(layout)[1]
            stored = sizes[name][0] if name in sizes else 0
            if stored != nbytes:
                raise UserError(
                    f"{self.path}: tensor {name!r} stores {stored} bytes; its "
                    f"{entry['codec']} metadata says {nbytes}"
                )
            entry["parts"] = sorted(layout)

    @property
    def header(self) -> dict[str, Any]:
        return self._header

    @property
    def format_version(self) -> str:
        return self._format_version

    @property
    def entries(self) -> dict[str, dict[str, Any]]:
        return self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    @property
    def is_reference(self) -> bool:
        """A reference pack: no stored deltas; they are read from the source (module doc)."""
        return self._reference is not None

    @property
    def reference(self) -> dict[str, Any] | None:
        """``{"source": weights digest, "files": {file: hash}}`` of a reference pack, else None."""
        return self._reference

    def attach(
        self,
        base: str | os.PathLike[str] | None = None,
        source: str | os.PathLike[str] | None = None,
    ) -> None:
        """Give the reader the model folders it reads tensors from (opened lazily, once)."""
        if base is not None:
            self._folders["base"] = Path(base)
        if source is not None:
            self._folders["source"] = Path(source)

    def _model(self, role: str, name: str) -> ModelWeights:
        """The base or source model folder, opened on first use; a clear error without it."""
        current = self._base if role == "base" else self._source
        if current is not None:
            return current
        with self._opening:
            return self._open(role, name)

    def _open(self, role: str, name: str) -> ModelWeights:
        current = self._base if role == "base" else self._source
        if current is not None:
            return current
        folder = self._folders[role]
        if folder is None:
            what = (
                f"a reference pack (lossless, source weights {self._reference['source'][:16]}…, "
                "stored as a pointer)"
                if self._reference is not None
                else "a pack"
            )
            raise UserError(
                f"{self.path}: tensor {name!r}: {what}; reading it needs its {role} model "
                f"folder, which was not given"
            )
        opened = ModelWeights(folder)
        if role == "base":
            self._base = opened
        else:
            self._source = opened
        return opened

    def _computed_delta(
        self,
        name: str,
        placement: Placement,
        base_tensor: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A reference pack's delta: ``source - base`` in float32, computed exactly as the
        ``exact`` codec's pack step computes the delta it stores (same values, bit for bit)."""
        import torch

        from graftbuild.weights.memory import empty_like
        from graftbuild.weights.tensors import all_finite

        entry = self._entry(name)
        base, source = self._model("base", name), self._model("source", name)
        for m in (base, source):
            info = m.infos.get(name)
            if info is None or list(info.shape) != list(entry["shape"]):
                raise UserError(
                    f"{self.path}: tensor {name!r}: {m.folder} does not hold it with shape "
                    f"{entry['shape']} (is this the pack's {'base' if m is base else 'source'}?)"
                )
        if base_tensor is not None:
            b = placement.put(base_tensor, torch.float32)
        else:
            b = placement.put(base.map(name), torch.float32)
        x = placement.put(source.map(name), torch.float32)
        delta = torch.sub(x, b, out=empty_like(x) if out is None else out)
        del b, x
        if not all_finite(delta):
            raise UserError(f"{source.folder}: tensor {name!r}: NaN or Inf in the delta")
        return delta

    def delta_chunks(
        self,
        name: str,
        device: Placement | str | None = None,
        base_tensor: torch.Tensor | None = None,
        check_finite: bool = True,
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(start, stop, delta[start:stop])`` over the flattened delta of ``name``: a stored
        pack's decoded delta in one piece; a reference pack's in pieces of ``DELTA_CHUNK``
        entries computed into one small buffer, so that folding a second source into an
        accumulator costs no tensor-sized delta (same values as ``decode``). A non-finite
        entry is an error unless ``check_finite`` is False (the caller checks what it makes of
        the pieces instead: a NaN or infinity in a delta reaches any weighted sum of it)."""
        import torch

        from graftbuild.weights.placement import Placement

        placement = Placement.of(device)
        if self._reference is None:
            delta = self.decode(name, placement)
            yield 0, delta.numel(), delta.reshape(-1)
            return
        from graftbuild.weights.memory import forget_pages

        self._entry(name)
        base, source = self._model("base", name), self._model("source", name)
        b = (base_tensor if base_tensor is not None else base.map(name)).reshape(-1)
        x = source.map(name).reshape(-1)  # ours alone: its pages are let go once subtracted
        if b.numel() != x.numel():
            raise UserError(f"{self.path}: tensor {name!r}: base and source sizes differ")
        buf = placement.put(torch.empty(0)).new_empty(min(DELTA_CHUNK, x.numel()))
        for lo in range(0, x.numel(), DELTA_CHUNK):
            hi = min(lo + DELTA_CHUNK, x.numel())
            d = torch.sub(
                placement.put(x[lo:hi], torch.float32),
                placement.put(b[lo:hi], torch.float32),
                out=buf[: hi - lo],
            )
            if check_finite and not all_finite(d):
                raise UserError(f"{source.folder}: tensor {name!r}: NaN or Inf in the delta")
            forget_pages(x, lo, hi)  # resident memory: one piece of the source, not its tensor
            if base_tensor is None:
                forget_pages(b, lo, hi)
            yield lo, hi, d

    def reference_source(self, name: str) -> torch.Tensor:
        """A reference pack's source tensor ``name`` as stored, mapped from the source folder
        (no copy), after checking that the source holds it with the pack's shape. For readers
        that compute ``source - base`` themselves (the streamed fuse)."""
        if self._reference is None:
            raise ValueError(f"{self.path}: not a reference pack")
        entry = self._entry(name)
        source = self._model("source", name)
        info = source.infos.get(name)
        if info is None or list(info.shape) != list(entry["shape"]):
            raise UserError(
                f"{self.path}: tensor {name!r}: {source.folder} does not hold it with shape "
                f"{entry['shape']} (is this the pack's source?)"
            )
        return source.map(name)

    def source_tensor(self, name: str, device: Placement | str | None = None) -> torch.Tensor:
        """The fine-tuned (source) tensor ``name`` in float32 on ``device``: read from the
        source folder for a reference pack, base + decoded delta for a stored one (then only
        the base folder is needed). For fusion strategies that need the source's weights."""
        import torch

        from graftbuild.weights.placement import Placement

        placement = Placement.of(device)
        self._entry(name)
        if self._reference is not None:
            return placement.put(self._model("source", name).map(name), torch.float32).clone()
        base = placement.put(self._model("base", name).map(name), torch.float32)
        return torch.add(base, self.decode(name, placement))

    def _entry(self, name: str) -> dict[str, Any]:
        if name not in self._entries:
            raise UserError(f"{self.path}: no tensor {name!r} in this SkillPack")
        return self._entries[name]

    def _codec(self, name: str, entry: dict[str, Any]) -> Any:
        try:
            codec = get_codec(entry["codec"])
        except ValueError as exc:
            raise UserError(f"{self.path}: tensor {name!r}: {exc}") from None
        if int(entry.get("codec_version", 1)) > codec.version:
            raise UserError(
                f"{self.path}: tensor {name!r} uses {codec.name} codec version "
                f"{entry['codec_version']}, newer than this graftbuild's {codec.version}"
            )
        return codec

    def decode(
        self,
        name: str,
        device: Placement | str | None = None,
        base_tensor: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The float32 delta of ``name`` in its original shape, decoded on ``device`` (a
        Placement or a device name; default the CPU): the stored parts are moved there first
        and the codec decodes there.

        For a reference pack only (a stored one ignores them): ``base_tensor``, the base's
        tensor if the caller holds it already (not read again), and ``out``, a float32 buffer
        of the tensor's shape on ``device`` to compute the delta into (else a fresh one)."""
        import torch

        from graftbuild.weights.placement import Placement

        if self._f is None:
            raise ValueError(f"{self.path}: the reader is closed")
        entry = self._entry(name)
        placement = Placement.of(device)
        if self._reference is not None:
            return self._computed_delta(name, placement, base_tensor, out)
        codec = self._codec(name, entry)
        shape = tuple(int(d) for d in entry["shape"])
        parts = self._parts(name, entry)
        if placement.on_accelerator:
            parts = {p: placement.put(t) for p, t in parts.items()}
        rows = int(entry.get("added_rows", 0))
        if rows:
            # rows beyond the base's (a source's new tokens) are stored whole, after the
            # codec's decoding of the base-shaped delta
            added = parts.pop(ADDED_ROWS).to(torch.float32)
            inner = codec.decode(parts, entry.get("meta", {}), (shape[0] - rows, *shape[1:]))
            out = torch.cat([inner.to(torch.float32), added.to(inner.device)])
        else:
            out = codec.decode(parts, entry.get("meta", {}), shape)
        if tuple(out.shape) != shape:
            raise UserError(
                f"{self.path}: tensor {name!r} decoded to {tuple(out.shape)}, not {shape}"
            )
        return out.to(torch.float32)

    def _parts(self, name: str, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The stored parts of ``name`` as CPU tensors: copy-on-write maps of the file (a codec
        that only reads its parts copies nothing), except a part that lies unaligned for its
        dtype in the file, copied."""
        import torch

        from graftbuild.weights.tensors import st_to_torch_dtype

        assert self._raw is not None
        if self._legacy:
            return {p: self._raw.map(part_key(name, p)) for p in entry["parts"]}
        self._codec(name, entry)  # an unknown or newer codec: the error names it
        layout = stored_layout(entry)
        offsets, nbytes = run_offsets(layout)
        if not nbytes:
            return {
                p: torch.empty(shape, dtype=st_to_torch_dtype(tag))
                for p, (tag, shape) in layout.items()
            }
        run = self._raw.map(name)
        if run.numel() != nbytes:
            raise UserError(f"{self.path}: tensor {name!r}: stored bytes do not match its entry")
        out = {}
        for p, (begin, end) in offsets.items():
            tag, shape = layout[p]
            dtype = st_to_torch_dtype(tag)
            piece = run[begin:end]
            if piece.storage_offset() % dtype.itemsize:
                piece = piece.clone()
            out[p] = piece.view(dtype).reshape(shape)
        return out

    def part(self, name: str, part: str) -> torch.Tensor:
        """One stored part of a tensor's encoding, as stored (e.g. a low-rank factor)."""
        if self._f is None:
            raise ValueError(f"{self.path}: the reader is closed")
        entry = self._entry(name)
        if part not in entry.get("parts", []):
            raise UserError(f"{self.path}: tensor {name!r} has no part {part!r}")
        if self._legacy:
            return self._f.get_tensor(part_key(name, part))
        return self._parts(name, entry)[part].clone()

    def payload_nbytes(self) -> int:
        """Bytes of all stored tensors (the file minus its header)."""
        if self._f is None:
            raise ValueError(f"{self.path}: the reader is closed")
        total = 0
        keys = self._f.keys()  # safe_open objects are not iterable
        for key in keys:
            sl = self._f.get_slice(key)
            total += ST_ITEMSIZE[sl.get_dtype()] * math.prod(sl.get_shape())
        return total

    def entry_nbytes(self, name: str) -> int:
        """Bytes of the stored parts of one tensor."""
        if self._f is None:
            raise ValueError(f"{self.path}: the reader is closed")
        entry = self._entry(name)
        if not self._legacy:
            if self._reference is not None or name not in self._raw.infos:  # type: ignore[union-attr]
                return 0
            return int(self._f.get_slice(name).get_shape()[0])
        total = 0
        for part in entry["parts"]:
            sl = self._f.get_slice(part_key(name, part))
            total += ST_ITEMSIZE[sl.get_dtype()] * math.prod(sl.get_shape())
        return total

    def expected_nbytes(self) -> int:
        """Payload the codecs predict from ranks, bits and kept entries alone (plus added
        token rows, stored whole as float32)."""
        total = 0
        for name, e in self._entries.items():
            shape = tuple(e["shape"])
            rows = int(e.get("added_rows", 0))
            if rows:
                total += 4 * rows * math.prod(shape[1:])
                shape = (shape[0] - rows, *shape[1:])
            total += self._codec(name, e).expected_nbytes(e.get("meta", {}), shape)
        return total

    def close(self) -> None:
        if getattr(self, "_f", None) is not None:
            self._f.__exit__(None, None, None)
        self._f = None
        if getattr(self, "_raw", None) is not None:
            self._raw.close()  # type: ignore[union-attr]
        self._raw = None
        for m in (getattr(self, "_base", None), getattr(self, "_source", None)):
            if m is not None:
                m.close()
        self._base = self._source = None

    def __enter__(self) -> PackReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
