"""Writing SkillPack files: encoding one tensor with its codec, planned layouts, ``PackWriter``."""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

from graftbuild.cache import durability
from graftbuild.cache.hashing import note_written
from graftbuild.cache.writing import HashedWriter
from graftbuild.compress.codecs import Codec, CodecParams, Encoded, get_codec, parse_spec
from graftbuild.compress.roles import ROLES
from graftbuild.skillpack.format import (
    COPY_CHUNK,
    FORMAT_VERSION,
    METADATA_KEY,
    PART_SEP,
    UMASK,
    canonical_json,
    part_key,
)
from graftbuild.weights.tensors import ST_ITEMSIZE, all_finite, torch_dtype_to_st

if TYPE_CHECKING:
    import torch

Spec = Mapping[str, Any] | tuple[Codec, CodecParams]
"""A compression spec as the recipe has it (``{"method": ..., **params}``), or already parsed."""


def parse(spec: Spec) -> tuple[Codec, CodecParams]:
    """The codec and validated parameters of ``spec`` (parsed once; a parsed pair is returned
    as it is)."""
    if isinstance(spec, tuple):
        return spec
    return parse_spec(spec)


def encode_with(
    codec: Codec, params: CodecParams, delta: torch.Tensor, calibration: Any = None
) -> Encoded:
    """``delta`` (float32) encoded by ``codec``; ``calibration`` goes to codecs that take it."""
    if calibration is not None:
        return codec.encode(delta, params, calibration=calibration)  # type: ignore[call-arg]
    return codec.encode(delta, params)


def encode_tensor(
    delta: torch.Tensor,
    spec: Spec,
    calibration: Any = None,
    check_finite: bool = True,
) -> tuple[str, dict, Encoded]:
    """(codec name, normalised params with defaults, encoding) of ``delta`` under ``spec``.

    The delta is converted to float32 first and the codec computes on its device (parts come
    back on the CPU); non-finite entries are a ValueError (``check_finite=False``: the caller
    has checked already, one pass over a large tensor saved). ``calibration`` (a
    :class:`~graftbuild.compress.gptq.Calibration`) goes to codecs that take it (``mixed``).
    """
    import torch

    codec, params = parse(spec)
    x = delta.detach().to(torch.float32)
    if check_finite and not all_finite(x):
        raise ValueError("the delta has NaN or infinite entries")
    return codec.name, params.model_dump(mode="json"), encode_with(codec, params, x, calibration)


class TensorLayout(NamedTuple):
    """One tensor's pack entry as it will be, known before encoding (see ``plan_layout``)."""

    role: str
    codec: str
    params: dict[str, Any]
    shape: tuple[int, ...]
    dtype: str
    meta: dict[str, Any]
    parts: dict[str, tuple[str, list[int]]]  # part -> (safetensors dtype, shape)


def plan_layout(spec: Spec, role: str, shape: tuple[int, ...], dtype: str) -> TensorLayout | None:
    """The entry and part shapes ``spec``'s codec will produce for a delta of ``shape``, when they
    follow from the shape alone (``codec.layout`` answers), else None."""
    codec, params = parse(spec)
    known = codec.layout(params, tuple(shape))
    if known is None:
        return None
    meta, parts = known
    dumped = params.model_dump(mode="json")
    return TensorLayout(role, codec.name, dumped, tuple(shape), dtype, meta, parts)


class PackWriter:
    """Writes one SkillPack file atomically (temp file in the same folder, then ``os.replace``).

    Without ``layout``, parts are spilled to a temporary file as they come and the pack is written
    at ``close``, once every part's size is known. With ``layout`` (every tensor's entry and part
    shapes known before encoding: ``plan_layout``), the header is written first and each tensor's
    parts go straight to their place: the same bytes, written once; ``add`` must then be called
    in the order ``self.order`` gives (the file's). Either way the file is hashed as it is written
    and the hash recorded for the store (graftbuild/writing.py).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        header: dict[str, Any],
        layout: Mapping[str, TensorLayout] | None = None,
    ) -> None:
        self.path = Path(path)
        self.header = json.loads(canonical_json(header))  # a private copy; fails now on non-JSON
        self._entries: dict[str, dict[str, Any]] = {}
        # part key -> (safetensors dtype, shape, offset in the spill file, nbytes, itemsize)
        self._parts: dict[str, tuple[str, list[int], int, int, int]] = {}
        self._spill: BinaryIO | None = None
        self._out: HashedWriter | None = None
        self._tmp: Path | None = None  # the pack being written, renamed into place at close
        self._spill_path: Path | None = None
        self._closed = False
        self.order: list[str] | None = None
        """Planned writing: the tensor names in file order, the order ``add`` takes them in."""
        if layout is not None:
            self._plan(layout)
        if self.order is None:
            fd, spill = tempfile.mkstemp(
                prefix=f".{self.path.name}.", suffix=".spill", dir=self.path.parent
            )
            self._spill_path = Path(spill)
            self._spill = os.fdopen(fd, "w+b")
            self._spill_size = 0

    def _plan(self, layout: Mapping[str, TensorLayout]) -> None:
        """Lay the file out from ``layout`` and write its header; leaves ``order`` None (spill
        mode) when some tensor's parts would not be contiguous in the file."""
        entries: dict[str, dict[str, Any]] = {}
        parts: dict[str, tuple[str, list[int], int, int, int]] = {}
        for name, t in layout.items():
            entries[name] = self._entry(
                name, t.role, t.codec, t.params, t.shape, t.dtype, t.meta, sorted(t.parts)
            )
            for part, (tag, shape) in t.parts.items():
                itemsize = ST_ITEMSIZE[tag]
                parts[part_key(name, part)] = (
                    tag,
                    list(shape),
                    -1,
                    itemsize * math.prod(shape),
                    itemsize,
                )
        self._entries, self._parts = entries, parts
        head, keys, payload = self._st_header()
        order = [key.split(PART_SEP, 1)[0] for key in keys]
        runs = [n for i, n in enumerate(order) if i == 0 or order[i - 1] != n]
        if len(runs) != len(set(runs)):  # a tensor's parts interleave with another's
            self._entries, self._parts = {}, {}
            return
        self._file_keys = keys
        self._next = 0
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
        )
        self._tmp = Path(tmp)
        self._out = HashedWriter(self._tmp, fd, size=8 + len(head) + payload)
        try:
            self._out.write(struct.pack("<Q", len(head)))
            self._out.write(head)
        except BaseException:
            self.abort()
            raise
        self._planned = entries
        self._added: set[str] = set()
        self.order = runs

    def _entry(
        self,
        name: str,
        role: str,
        codec_name: str,
        params: dict[str, Any] | CodecParams,
        shape: tuple[int, ...] | list[int] | torch.Size,
        dtype: str,
        meta: dict[str, Any],
        part_names: list[str],
    ) -> dict[str, Any]:
        """The canonical metadata entry of one tensor (checked: name, role, codec, params)."""
        if PART_SEP in name or not name:
            raise ValueError(f"tensor name {name!r} must be non-empty and not contain {PART_SEP!r}")
        if role not in ROLES:
            raise ValueError(f"tensor {name!r}: unknown role {role!r}; valid roles: {ROLES}")
        codec = get_codec(codec_name)
        if not isinstance(params, codec.Params):  # validated already when it is the Params
            params = codec.Params.model_validate(params)
        norm_params = params.model_dump(mode="json")
        entry = {
            "role": role,
            "codec": codec.name,
            "codec_version": codec.version,
            "params": norm_params,
            "shape": [int(d) for d in shape],
            "dtype": str(dtype).removeprefix("torch."),
            "meta": meta,
            "parts": sorted(part_names),
        }
        try:
            return json.loads(canonical_json(entry))  # a private copy, as the reader will see it
        except (TypeError, ValueError) as exc:
            raise ValueError(f"tensor {name!r}: metadata is not canonical JSON ({exc})") from exc

    def add(
        self,
        name: str,
        role: str,
        codec_name: str,
        params: dict[str, Any] | CodecParams,
        shape: tuple[int, ...] | list[int] | torch.Size,
        dtype: str,
        encoded: Encoded,
    ) -> None:
        """Append one tensor's encoding. ``dtype`` is the original weight dtype's name."""
        import torch

        if self._closed:
            raise ValueError(f"{self.path}: the pack writer is closed")
        added = self._added if self.order is not None else self._entries
        if name in added:
            raise ValueError(f"tensor {name!r} added twice to {self.path}")
        entry = self._entry(
            name, role, codec_name, params, shape, dtype, encoded.meta, list(encoded.parts)
        )
        staged: dict[str, tuple[str, list[int], torch.Tensor, int]] = {}
        for part in entry["parts"]:
            t = encoded.parts[part]
            if PART_SEP in part or not part:
                raise ValueError(f"tensor {name!r}: bad part name {part!r}")
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                raise ValueError(f"tensor {name!r}: part {part!r} is not a CPU tensor")
            try:
                tag = torch_dtype_to_st(t.dtype)
            except KeyError:
                raise ValueError(
                    f"tensor {name!r}: part {part!r} has unsupported dtype {t.dtype}"
                ) from None
            itemsize = ST_ITEMSIZE[tag]
            staged[part] = (tag, list(t.shape), t.detach().contiguous(), itemsize)
        if self.order is not None:
            self._write_planned(name, entry, staged)
            return
        assert self._spill is not None
        for part, (tag, shape_, t, itemsize) in staged.items():
            data = t.reshape(-1).view(torch.uint8).numpy()
            self._spill.write(memoryview(data))
            self._parts[part_key(name, part)] = (
                tag,
                shape_,
                self._spill_size,
                data.nbytes,
                itemsize,
            )
            self._spill_size += data.nbytes
        self._entries[name] = entry

    def _write_planned(
        self, name: str, entry: dict[str, Any], staged: dict[str, tuple[str, list[int], Any, int]]
    ) -> None:
        """Write one tensor's parts at their place in the file, after checking that they are
        what the layout promised (the header is already written)."""
        import torch

        assert self.order is not None and self._out is not None
        if name not in self._planned:
            raise ValueError(f"tensor {name!r} is not in the layout of {self.path}")
        expected = self.order[len(self._added)]
        if name != expected:
            raise ValueError(f"tensor {name!r} added out of order: {expected!r} comes first")
        if entry != self._planned[name] or any(
            self._parts[part_key(name, p)][:2] != (tag, shape)
            for p, (tag, shape, _, _) in staged.items()
        ):
            raise ValueError(f"tensor {name!r}: its encoding does not match the planned layout")
        while (
            self._next < len(self._file_keys)
            and self._file_keys[self._next].split(PART_SEP, 1)[0] == name
        ):
            part = self._file_keys[self._next].split(PART_SEP, 1)[1]
            self._out.write(staged[part][2].reshape(-1).view(torch.uint8).numpy())
            self._next += 1
        self._added.add(name)

    def _st_header(self) -> tuple[bytes, list[str], int]:
        """(safetensors header bytes, part keys in file order, payload bytes)."""
        doc = {"format_version": FORMAT_VERSION, "header": self.header, "tensors": self._entries}
        # Widest dtypes first keeps every tensor aligned to its element size.
        order = sorted(self._parts, key=lambda k: (-self._parts[k][4], k))
        st_header: dict[str, Any] = {"__metadata__": {METADATA_KEY: canonical_json(doc)}}
        offset = 0
        for key in order:
            tag, shape, _, nbytes, _ = self._parts[key]
            st_header[key] = {
                "dtype": tag,
                "shape": shape,
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        head = canonical_json(st_header).encode("utf-8")
        head += b" " * (-len(head) % 8)
        return head, order, offset

    def close(self) -> int:
        """Write the file and return its size in bytes."""
        if self._closed:
            raise ValueError(f"{self.path}: the pack writer is already closed")
        if sys.byteorder != "little":
            raise RuntimeError("SkillPack files are little-endian; big-endian hosts unsupported")
        try:
            if self.order is not None:
                missing = [n for n in self.order if n not in self._added]
                if missing:
                    raise ValueError(f"{self.path}: tensors never added: {missing[:5]}")
                out = self._out
            else:
                out = self._write_from_spill()
            assert out is not None
            os.fchmod(out.fileno(), 0o666 & ~UMASK)
            if durability.fsync_objects():  # else written back by the kernel: durability.py
                out.sync()
            out.close()
            assert self._tmp is not None
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._tmp = None
        self.abort()
        note_written(self.path, out.digest)  # the store need not read the pack back
        return out.size

    def _write_from_spill(self) -> HashedWriter:
        """The pack, written in one pass from the spill file (``abort`` then drops it)."""
        assert self._spill is not None
        head, order, payload = self._st_header()
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
        )
        self._spill.flush()
        self._tmp = Path(tmp)
        self._out = out = HashedWriter(tmp, fd, size=8 + len(head) + payload)
        out.write(struct.pack("<Q", len(head)))
        out.write(head)
        buf = bytearray(COPY_CHUNK)
        for key in order:
            _, _, start, nbytes, _ = self._parts[key]
            left = nbytes
            while left:
                n = os.preadv(
                    self._spill.fileno(),
                    [memoryview(buf)[: min(left, COPY_CHUNK)]],
                    start + nbytes - left,
                )
                if n <= 0:
                    raise OSError(f"{self._spill_path}: spill file truncated")
                out.write(memoryview(buf)[:n])
                left -= n
        return out

    def abort(self) -> None:
        """Discard everything; no file is written."""
        self._closed = True
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        if self._spill_path is not None:
            self._spill_path.unlink(missing_ok=True)
            self._spill_path = None
        if self._out is not None:
            self._out.close()
            self._out = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def __enter__(self) -> PackWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            if not self._closed:
                self.close()
        else:
            self.abort()
