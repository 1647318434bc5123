"""Writing SkillPack files: encoding one tensor with its codec, planned layouts, ``PackWriter``."""

from __future__ import annotations

import json
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
    ADDED_ROWS,
    COPY_CHUNK,
    FORMAT_VERSION,
    METADATA_KEY,
    PART_SEP,
    REFERENCE_FORMAT_VERSION,
    UMASK,
    PartLayout,
    canonical_json,
    run_alignment,
    run_offsets,
    stored_layout,
)
from graftbuild.weights.tensors import all_finite, check_finite, torch_dtype_to_st

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


def reference_layout(role: str, shape: tuple[int, ...], dtype: str) -> TensorLayout:
    """A reference pack's entry for one tensor: ``exact``, no parts (the delta is read from the
    source). A ``PackWriter`` given a header with a ``reference`` key and only such entries writes
    a reference pack (format 2.0): its header and entries, no payload."""
    return TensorLayout(role, "exact", {}, tuple(shape), dtype, {}, {})


def write_stored(reader: Any, path: str | os.PathLike[str]) -> int:
    """A reference pack (``reader``, given its base and source folders) rewritten as a stored
    pack at ``path``: exactly the bytes the pack step writes for the same lossless delta
    (same header less ``reference``). For when a pack must stand alone (a runtime bundle).
    Returns the file's size."""
    from graftbuild.compress.codecs.exact import encode_exact

    if not reader.is_reference:
        raise ValueError(f"{reader.path}: not a reference pack")
    header = {k: v for k, v in reader.header.items() if k != "reference"}
    exact = {"method": "exact"}
    layout = {
        name: plan_layout(exact, e["role"], tuple(e["shape"]), e["dtype"])
        for name, e in reader.entries.items()
    }
    with PackWriter(path, header, layout) as writer:  # type: ignore[arg-type]
        assert writer.order is not None
        for name in writer.order:
            e = reader.entries[name]
            encoded = encode_exact(reader.decode(name))
            writer.add(name, e["role"], "exact", {}, e["shape"], e["dtype"], encoded)
            del encoded
        return writer.close()


class PackWriter:
    """Writes one SkillPack file atomically (temp file in the same folder, then ``os.replace``).

    Each tensor's parts become one run of bytes (format.run_offsets), stored as one safetensors
    ``U8`` entry named after the tensor. Without ``layout``, runs are spilled to a temporary file
    as they come and the pack is written at ``close``, once every run's size is known. With
    ``layout`` (every tensor's entry and part shapes known before encoding: ``plan_layout``), the
    header is written first and each run goes straight to its place: the same bytes, written
    once; ``add`` must then be called in the order ``self.order`` gives (the file's). Either way
    the file is hashed as it is written and the hash recorded for the store
    (graftbuild/writing.py).
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
        # tensor -> (offset of its run in the spill file, run bytes); spill mode only
        self._runs: dict[str, tuple[int, int]] = {}
        self._spill: BinaryIO | None = None
        self._out: HashedWriter | None = None
        self._tmp: Path | None = None  # the pack being written, renamed into place at close
        self._spill_path: Path | None = None
        self._closed = False
        self.order: list[str] | None = None
        """Planned writing: the tensor names in file order, the order ``add`` takes them in."""
        if layout is not None:
            self._plan(layout)
        else:
            fd, spill = tempfile.mkstemp(
                prefix=f".{self.path.name}.", suffix=".spill", dir=self.path.parent
            )
            self._spill_path = Path(spill)
            self._spill = os.fdopen(fd, "w+b")
            self._spill_size = 0

    @property
    def _reference(self) -> bool:
        """A header naming a source ("reference") makes a reference pack: see reference_layout."""
        return "reference" in self.header

    def _plan(self, layout: Mapping[str, TensorLayout]) -> None:
        """Lay the file out from ``layout`` and write its header."""
        entries: dict[str, dict[str, Any]] = {}
        runs: dict[str, tuple[int, int]] = {}
        for name, t in layout.items():
            entries[name] = self._entry(
                name, t.role, t.codec, t.params, t.shape, t.dtype, t.meta, t.parts
            )
            runs[name] = (-1, run_offsets(t.parts)[1])
        self._entries, self._runs = entries, runs
        head, keys, payload = self._st_header()
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
        # tensors without parts (a zero delta) have no place in the file: they come last; a
        # reference pack's entries (no parts either) are complete as planned, never added
        partless = [] if self._reference else sorted(n for n in layout if n not in keys)
        self.order = keys + partless

    def _entry(
        self,
        name: str,
        role: str,
        codec_name: str,
        params: dict[str, Any] | CodecParams,
        shape: tuple[int, ...] | list[int] | torch.Size,
        dtype: str,
        meta: dict[str, Any],
        parts: PartLayout,
        added_rows: int = 0,
    ) -> dict[str, Any]:
        """The canonical metadata entry of one tensor (checked: name, role, codec, params, and
        ``parts``, part -> (safetensors dtype, shape), against what the codec's metadata says
        it stores: a reader finds the parts from the metadata alone). ``added_rows``: rows
        beyond the base's (new tokens), stored whole in part ``added_rows``; ``shape`` then
        counts them."""
        if PART_SEP in name or not name or name == "__metadata__":
            raise ValueError(
                f"tensor name {name!r} must be non-empty, not __metadata__ and not contain "
                f"{PART_SEP!r}"
            )
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
        }
        if self._reference:
            if parts:
                raise ValueError(f"tensor {name!r}: a reference pack stores no parts")
            entry["parts"] = []  # format 2.0 lists the parts: none
        if added_rows:
            if ADDED_ROWS not in parts or not shape or int(shape[0]) <= added_rows:
                raise ValueError(f"tensor {name!r}: {added_rows} added rows need part {ADDED_ROWS}")
            entry["added_rows"] = int(added_rows)
        try:
            entry = json.loads(canonical_json(entry))  # a private copy, as the reader will see it
        except (TypeError, ValueError) as exc:
            raise ValueError(f"tensor {name!r}: metadata is not canonical JSON ({exc})") from exc
        if self._reference:
            return entry
        try:
            expected = stored_layout(entry)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"tensor {name!r}: {codec.name} metadata is incomplete ({exc})"
            ) from exc
        got = {p: (tag, [int(d) for d in dims]) for p, (tag, dims) in parts.items()}
        if got != expected:
            raise ValueError(
                f"tensor {name!r}: parts {got} are not the {expected} its {codec.name} metadata "
                "describes"
            )
        return entry

    def add(
        self,
        name: str,
        role: str,
        codec_name: str,
        params: dict[str, Any] | CodecParams,
        shape: tuple[int, ...] | list[int] | torch.Size,
        dtype: str,
        encoded: Encoded,
        added_rows: int = 0,
    ) -> None:
        """Append one tensor's encoding. ``dtype`` is the original weight dtype's name;
        ``added_rows``: see ``_entry``."""
        import torch

        if self._closed:
            raise ValueError(f"{self.path}: the pack writer is closed")
        added = self._added if self.order is not None else self._entries
        if name in added:
            raise ValueError(f"tensor {name!r} added twice to {self.path}")
        staged: dict[str, torch.Tensor] = {}
        layout: PartLayout = {}
        for part, t in encoded.parts.items():
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
            check_finite(name, t, f"pack part {part!r} of tensor")
            layout[part] = (tag, list(t.shape))
            staged[part] = t.detach().contiguous()
        entry = self._entry(
            name, role, codec_name, params, shape, dtype, encoded.meta, layout, added_rows
        )
        offsets, nbytes = run_offsets(layout)
        if self.order is not None:
            self._write_planned(name, entry, staged, offsets)
            return
        assert self._spill is not None
        for part in offsets:
            self._spill.write(memoryview(staged[part].reshape(-1).view(torch.uint8).numpy()))
        if nbytes:
            self._runs[name] = (self._spill_size, nbytes)
        self._spill_size += nbytes
        self._entries[name] = entry

    def _write_planned(
        self,
        name: str,
        entry: dict[str, Any],
        staged: dict[str, Any],
        offsets: dict[str, tuple[int, int]],
    ) -> None:
        """Write one tensor's run at its place in the file, after checking that it is what the
        layout promised (the header is already written)."""
        import torch

        assert self.order is not None and self._out is not None
        if name not in self._planned:
            raise ValueError(f"tensor {name!r} is not in the layout of {self.path}")
        expected = self.order[len(self._added)]
        if name != expected:
            raise ValueError(f"tensor {name!r} added out of order: {expected!r} comes first")
        if entry != self._planned[name]:  # the entry fixes every part's dtype and shape
            raise ValueError(f"tensor {name!r}: its encoding does not match the planned layout")
        for part in offsets:
            self._out.write(staged[part].reshape(-1).view(torch.uint8).numpy())
        self._added.add(name)

    def _st_header(self) -> tuple[bytes, list[str], int]:
        """(safetensors header bytes, tensors with stored bytes in file order, payload bytes)."""
        version = REFERENCE_FORMAT_VERSION if self._reference else FORMAT_VERSION
        doc = {"format_version": version, "header": self.header, "tensors": self._entries}
        runs = {name: nbytes for name, (_, nbytes) in self._runs.items() if nbytes}
        # runs whose length has the larger power-of-two factor first: each then starts aligned
        # to it (the data starts 8-aligned), and so do its parts (format.run_offsets)
        order = sorted(runs, key=lambda n: (-run_alignment(runs[n]), n))
        st_header: dict[str, Any] = {"__metadata__": {METADATA_KEY: canonical_json(doc)}}
        offset = 0
        for name in order:
            st_header[name] = {
                "dtype": "U8",
                "shape": [runs[name]],
                "data_offsets": [offset, offset + runs[name]],
            }
            offset += runs[name]
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
            start, nbytes = self._runs[key]
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


_PROBES: dict[tuple[str, str, tuple[int, ...]], Encoded] = {}
"""Probe encodings by (codec, params, probe shape): a budget's header is estimated many times
over while its reserve is bisected, mostly for the same specs."""


def estimate_header_nbytes(
    header: dict[str, Any],
    tensors: Mapping[str, tuple[str, Spec, tuple[int, ...], str]],
    payload: int = 10**9,
) -> int:
    """Bytes the safetensors header of a pack of ``tensors`` (name -> (role, spec, shape,
    dtype)) will take, within a few bytes per tensor: each spec is encoded on a small random
    matrix to learn its metadata (numbers in it differ in length only), and the header is laid
    out as ``PackWriter`` lays it, every offset as long as ``payload`` (an upper bound of the
    payload's size) and 4 bytes of slack per tensor for the real numbers. Lets a size budget
    bound the whole file."""
    import torch

    gen = torch.Generator().manual_seed(0)
    entries: dict[str, Any] = {}
    st: dict[str, Any] = {}
    slack = 0
    for name, (role, spec, shape, dtype) in sorted(tensors.items()):
        codec, params = parse(spec)
        probe_shape = tuple(min(int(d), 64) for d in shape) or ()
        key = (codec.name, canonical_json(params.model_dump(mode="json")), probe_shape)
        encoded = _PROBES.get(key)
        if encoded is None:
            probe = torch.randn(probe_shape, generator=gen) if probe_shape else torch.randn(())
            encoded = _PROBES[key] = encode_with(codec, params, probe)
            if len(_PROBES) > 4096:
                _PROBES.clear()
        entries[name] = {
            "role": role,
            "codec": codec.name,
            "codec_version": codec.version,
            "params": params.model_dump(mode="json"),
            "shape": [int(d) for d in shape],
            "dtype": dtype,
            "meta": encoded.meta,
        }
        if encoded.parts and any(t.numel() for t in encoded.parts.values()):
            st[name] = {"data_offsets": [payload, payload], "dtype": "U8", "shape": [payload]}
        slack += 4
    doc = {"format_version": FORMAT_VERSION, "header": header, "tensors": entries}
    head = canonical_json({"__metadata__": {METADATA_KEY: canonical_json(doc)}, **st})
    return 8 + len(head.encode("utf-8")) + slack
