"""Reading SkillPack files: ``PackReader`` decodes one tensor at a time."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

from graftbuild.compress.codecs import get_codec
from graftbuild.errors import UserError
from graftbuild.skillpack.format import (
    FORMAT_VERSION,
    METADATA_KEY,
    SUPPORTED_MAJOR,
    parse_version,
    part_key,
)
from graftbuild.weights.tensors import ST_ITEMSIZE, TensorFile

if TYPE_CHECKING:
    import torch

    from graftbuild.weights.placement import Placement


class PackReader:
    """Reads a SkillPack lazily: metadata at open, each tensor's parts only when decoded."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
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
        if major != SUPPORTED_MAJOR:
            raise UserError(
                f"{self.path}: SkillPack format version {version} is not supported "
                f"(this graftbuild reads {SUPPORTED_MAJOR}.x, writes {FORMAT_VERSION})"
            )
        keys = set(self._f.keys())
        for name, entry in entries.items():
            missing = [p for p in entry.get("parts", []) if part_key(name, p) not in keys]
            if missing:
                raise UserError(f"{self.path}: tensor {name!r} lacks parts {missing}")
        self._format_version: str = version
        self._header: dict[str, Any] = header
        self._entries: dict[str, dict[str, Any]] = entries

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

    def decode(self, name: str, device: Placement | str | None = None) -> torch.Tensor:
        """The float32 delta of ``name`` in its original shape, decoded on ``device`` (a
        Placement or a device name; default the CPU): the stored parts are moved there first
        and the codec decodes there."""
        import torch

        from graftbuild.weights.placement import Placement

        if self._f is None:
            raise ValueError(f"{self.path}: the reader is closed")
        entry = self._entry(name)
        codec = self._codec(name, entry)
        shape = tuple(int(d) for d in entry["shape"])
        assert self._raw is not None
        # copy-on-write maps: a codec that only reads its parts copies nothing
        parts = {p: self._raw.map(part_key(name, p)) for p in entry["parts"]}
        placement = Placement.of(device)
        if placement.on_accelerator:
            parts = {p: placement.put(t) for p, t in parts.items()}
        out = codec.decode(parts, entry.get("meta", {}), shape)
        if tuple(out.shape) != shape:
            raise UserError(
                f"{self.path}: tensor {name!r} decoded to {tuple(out.shape)}, not {shape}"
            )
        return out.to(torch.float32)

    def part(self, name: str, part: str) -> torch.Tensor:
        """One stored part of a tensor's encoding, as stored (e.g. a low-rank factor)."""
        if self._f is None:
            raise ValueError(f"{self.path}: the reader is closed")
        if part not in self._entry(name).get("parts", []):
            raise UserError(f"{self.path}: tensor {name!r} has no part {part!r}")
        return self._f.get_tensor(part_key(name, part))

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
        total = 0
        for part in self._entry(name)["parts"]:
            sl = self._f.get_slice(part_key(name, part))
            total += ST_ITEMSIZE[sl.get_dtype()] * math.prod(sl.get_shape())
        return total

    def expected_nbytes(self) -> int:
        """Payload the codecs predict from ranks, bits and kept entries alone."""
        return sum(
            self._codec(name, e).expected_nbytes(e.get("meta", {}), tuple(e["shape"]))
            for name, e in self._entries.items()
        )

    def close(self) -> None:
        if getattr(self, "_f", None) is not None:
            self._f.__exit__(None, None, None)
        self._f = None
        if getattr(self, "_raw", None) is not None:
            self._raw.close()  # type: ignore[union-attr]
        self._raw = None

    def __enter__(self) -> PackReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
