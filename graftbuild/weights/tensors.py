"""Model folders and streaming safetensors I/O.

Reading takes one tensor at a time straight from the file (``pread`` at the offsets the header
gives, into the tensor's own buffer); writing streams tensors into (possibly sharded) files whose
headers are laid out in advance, so neither side ever holds a whole model. Reading with ``pread``
rather than through one memory map of the whole file keeps the process's resident memory to the
tensors in hand: a mapped file's touched pages count as the process's own (RSS) until it is
unmapped, so reading a whole model through a map looks like holding it. Steps that only read a
tensor take ``map``: a copy-on-write mapping of that one tensor, unmapped when it is freed.
Weights are read from safetensors only: pickle formats are refused, never loaded.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graftbuild.cache.hashing import file_kind, is_tracked, open_regular
from graftbuild.cache.writing import WRITE_PIECE, HashedWriter
from graftbuild.errors import BuildError, UserError

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# safetensors dtype codes and their byte sizes (the format's own tags)
ST_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


def torch_dtype_to_st(dtype: torch.dtype) -> str:
    import torch

    table = {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
        torch.uint8: "U8", torch.bool: "BOOL",
    }  # fmt: skip
    return table[dtype]


def st_to_torch_dtype(code: str) -> torch.dtype:
    import torch

    table = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
        "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
        "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    }  # fmt: skip
    return table[code]


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` has no NaN or infinite entry. A NaN or an infinity makes the sum NaN or
    infinite, so a finite sum settles it in one allocation-free pass (tens of times faster than
    ``isfinite(t).all()`` on a large CPU tensor); only a sum that overflows looks entry by entry."""
    import torch

    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


MAX_HEADER = 100_000_000  # bytes: the safetensors library's own limit


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"key {k!r} appears twice in the header")
        seen[k] = v
    return seen


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _count(shape: Any) -> int:
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ValueError(f"shape {shape!r:.60} is not a list of sizes")
    count = 1
    for d in shape:
        count *= d
    return count


def parse_header(path: Path) -> tuple[dict[str, Any], int]:
    """The validated JSON header of a safetensors file and the offset its data starts at.

    The single parser every safetensors file graftbuild reads goes through, at least as strict
    as the safetensors library: a JSON object without duplicate keys, NaN or deep nesting; a
    ``__metadata__`` of strings; every tensor a known dtype, a shape of sizes and
    ``data_offsets`` whose span is exactly its bytes; and the tensors, in offset order, tiling
    the data section from its first byte to the file's last, with no overlap, hole or
    trailing byte. Anything else is a UserError naming the file (and the tensor)."""
    try:
        with open(open_regular(path), "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            size = os.fstat(f.fileno()).st_size
            if n > size - 8 or n > MAX_HEADER:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            text = f.read(n)
        if not text.startswith(b"{"):
            raise ValueError("the header does not start with '{'")
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise UserError(f"{path}: not a valid safetensors file (header nested too deep)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a valid safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a valid safetensors file (header is not a table)")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise UserError(f"{path}: not a valid safetensors file (__metadata__ is not strings)")
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            if not isinstance(entry, dict):
                raise ValueError("not a table")
            dtype, lo_hi = entry["dtype"], entry["data_offsets"]
            if dtype not in ST_ITEMSIZE:
                raise ValueError(f"unsupported dtype {dtype!r:.20}")
            expected = _count(entry["shape"]) * ST_ITEMSIZE[dtype]
            if (
                not isinstance(lo_hi, list)
                or len(lo_hi) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in lo_hi)
            ):
                raise ValueError(f"data_offsets {lo_hi!r:.60} is not [begin, end]")
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(
                f"{path}: tensor {name!r}: not a valid safetensors entry ({e}; {entry!r:.120})"
            ) from None
        lo, hi = lo_hi
        if lo < 0 or hi - lo != expected:
            raise UserError(
                f"{path}: tensor {name!r}: {dtype} {list(entry['shape'])} needs {expected} "
                f"bytes, its offsets span {hi - lo}"
            )
        spans.append((lo, hi, name))
    data = size - 8 - n
    at = 0
    for lo, hi, name in sorted(spans):
        if lo != at:
            what = (
                "overlaps the tensor before it"
                if lo < at
                else f"leaves a hole of {lo - at} bytes before it"
            )
            raise UserError(f"{path}: not a valid safetensors file (tensor {name!r} {what})")
        at = hi
    if at != data:
        raise UserError(
            f"{path}: the header describes {8 + n + at} bytes but the file has {size} "
            f"({'truncated' if size < 8 + n + at else 'trailing bytes'}); "
            "download or convert it again"
        )
    return header, 8 + n


def check_finite(name: str, t: torch.Tensor, what: str = "tensor") -> None:
    """BuildError (exit 1) unless every value of a floating tensor about to be written is
    finite, naming the tensor and the cause. The one check every tensor graftbuild writes
    (model weights, pack parts) passes through: a NaN or an overflow is never shipped."""
    import torch

    if not t.is_floating_point() or all_finite(t):
        return
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    if nan:
        cause = f"{nan} NaN value(s)"
    elif t.dtype in (torch.float16, torch.bfloat16):
        top = torch.finfo(t.dtype).max
        cause = f"{inf} value(s) overflow {str(t.dtype).removeprefix('torch.')} (beyond ±{top:g})"
    else:
        cause = f"{inf} infinite value(s)"
    raise BuildError(f"{what} {name!r} is not finite: {cause}; nothing was written")


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, read and validated without torch."""
    return parse_header(path)[0]


def weight_files(folder: Path) -> list[Path]:
    """The safetensors weight files of a folder (index-aware), or a UserError saying why not.

    Every file returned is a regular file the folder's content hash covers (``is_tracked``):
    an index entry that leaves the folder, names a hidden or markdown file, or goes through a
    linked sub-folder is refused, since what a node reads must be in its key."""
    if not folder.is_dir():
        raise UserError(f"model folder not found: {folder}")
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
            if not all(isinstance(f, str) for f in names):
                raise TypeError("weight_map values must be file names")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index}: not a valid safetensors index ({e})") from None
        for rel in names:
            _check_index_entry(folder, index, rel)
        files = [folder / f for f in names]
        missing = [f.name for f in files if not os.path.lexists(f)]
        if missing:
            raise UserError(f"{index} names missing weight files: {missing}")
    else:
        files = sorted(p for p in folder.glob("*.safetensors") if is_tracked(p.name))
        if not files:
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise UserError(
                    f"{folder}: weights only in pickle format ({', '.join(pickles)}); graftbuild "
                    "never unpickles (it can run code). Convert them to safetensors first."
                )
            raise UserError(
                f"{folder}: no safetensors weights (*.safetensors) in this model folder"
            )
    for f in files:
        mode = os.stat(f).st_mode
        if not stat.S_ISREG(mode):
            raise UserError(f"{f}: expected a safetensors weight file, found {file_kind(mode)}")
    return files


def _check_index_entry(folder: Path, index: Path, rel: str) -> None:
    parts = rel.split("/")
    bad = (
        not rel
        or rel.startswith("/")
        or "\\" in rel
        or "\0" in rel
        or any(p in ("", ".", "..") for p in parts)
        or not is_tracked(rel)
    )
    if not bad:
        at = folder
        for p in parts[:-1]:  # a linked sub-folder is not walked by the folder's hash
            at = at / p
            if at.is_symlink():
                bad = True
                break
    if bad:
        raise UserError(
            f"{index}: weight file {rel!r} is outside the model folder, hidden or linked; "
            "an index may only name files inside its folder"
        )


def check_weight_files(folder: Path) -> list[Path]:
    """``weight_files``, each checked against its own header (headers only, no tensor data is
    read, ``parse_header``), so a malformed, truncated or padded download is refused before
    anything is built."""
    files = weight_files(folder)
    for f in files:
        parse_header(f)
    return files


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code, e.g. "F32"
    file: Path
    offsets: tuple[int, int] = (0, 0)
    """Byte range in the file's data section (for tensors read from a file)."""

    @property
    def nbytes(self) -> int:
        n = ST_ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


class TensorFile:
    """One safetensors file opened for ``pread``: thread-safe, no memory map."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.header, self._start = parse_header(self.path)
        self.infos: dict[str, TensorInfo] = {}
        self._fd = open_regular(self.path)
        size = os.fstat(self._fd).st_size
        for name, entry in self.header.items():
            if name == "__metadata__":
                continue
            try:
                begin, end = (int(x) for x in entry["data_offsets"])
                shape = tuple(int(d) for d in entry["shape"])
                info = TensorInfo(name, shape, entry["dtype"], self.path, (begin, end))
                ok = 0 <= begin <= end <= size - self._start and end - begin == info.nbytes
            except (KeyError, TypeError, ValueError):
                ok = False
            if not ok:
                self.close()
                raise UserError(f"{self.path}: tensor {name!r} has a corrupt header entry")
            self.infos[name] = info

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.get("__metadata__") or {}

    def read(self, name: str) -> torch.Tensor:
        """A fresh CPU tensor with the stored bytes of ``name``."""

        from graftbuild.weights.memory import empty

        info = self.infos[name]
        begin, end = info.offsets
        buf = empty(end - begin)  # large ones on huge pages: fewer page faults (memory.py)
        view = memoryview(buf.numpy())
        got = 0
        while got < len(view):
            k = os.preadv(self._fd, [view[got:]], self._start + begin + got)
            if k <= 0:
                raise UserError(f"{self.path}: file truncated while reading tensor {name!r}")
            got += k
        return buf.view(self._dtype(name)).reshape(info.shape)

    def _dtype(self, name: str) -> torch.dtype:
        code = self.infos[name].dtype
        try:
            return st_to_torch_dtype(code)
        except KeyError:
            raise UserError(f"{self.path}: tensor {name!r}: unsupported dtype {code}") from None

    def map(self, name: str) -> torch.Tensor:
        """The stored bytes of ``name`` as a copy-on-write mapping of the file.

        Reading it costs no copy: its pages are the page cache's own, mapped on first touch. It
        behaves as a private tensor: a write copies the touched pages and never reaches the file.
        So a step that only reads a tensor (a fuse reading the base, a pack subtracting two
        models) saves the copy ``read`` makes, about half the cost of a warm read. The mapping
        covers this tensor's pages alone and is unmapped when the tensor is freed, so resident
        memory stays that of the tensors in hand. Falls back to ``read`` for an empty tensor or
        one whose bytes are not aligned for its dtype."""
        import torch

        info = self.infos[name]
        begin, end = info.offsets
        offset = self._start + begin
        itemsize = ST_ITEMSIZE.get(info.dtype, 1)
        if end == begin or offset % itemsize or not _CAN_MAP:
            return self.read(name)
        dtype = self._dtype(name)
        if os.fstat(self._fd).st_size < offset + end - begin:  # mapping past the end: SIGBUS
            raise UserError(f"{self.path}: file truncated while reading tensor {name!r}")
        aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
        region = mmap.mmap(
            self._fd,
            offset + end - begin - aligned,
            flags=mmap.MAP_PRIVATE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=aligned,
        )
        data = torch.frombuffer(region, dtype=torch.uint8)[offset - aligned :]  # keeps region
        return data.view(dtype).reshape(info.shape)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


_CAN_MAP = hasattr(mmap, "MAP_PRIVATE")


class ModelWeights:
    """Lazy access to a model folder's tensors, one at a time: fresh reads (``get``) or
    copy-on-write mappings (``map``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.files = weight_files(self.folder)
        self.infos: dict[str, TensorInfo] = {}
        self._handles: dict[Path, TensorFile] = {}
        try:
            for f in self.files:
                tf = self._handles[f] = TensorFile(f)
                for name, info in tf.infos.items():
                    if name in self.infos:
                        raise UserError(
                            f"{self.folder}: tensor {name!r} appears in two weight files"
                        )
                    self.infos[name] = info
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> ModelWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for tf in self._handles.values():
            tf.close()
        self._handles.clear()

    def names(self) -> list[str]:
        """Tensor names in file order then name order (the order shards are written in)."""
        return sorted(self.infos, key=lambda n: (self.files.index(self.infos[n].file), n))

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def get(self, name: str) -> torch.Tensor:
        """A fresh CPU tensor (safe to call from several threads at once)."""
        info = self.infos[name]
        return self._handles[info.file].read(name)

    def map(self, name: str) -> torch.Tensor:
        """A copy-on-write mapping of the stored tensor, for reading (``TensorFile.map``)."""
        info = self.infos[name]
        return self._handles[info.file].map(name)


# Weights of other runtimes (ONNX, OpenVINO, TF, Flax, GGUF) would be the base's, not the
# fused model's: never copied into an output.
_OTHER_WEIGHTS = (".onnx", ".h5", ".msgpack", ".tflite", ".ot", ".gguf")
_OTHER_WEIGHT_DIRS = ("onnx", "openvino")


def copy_non_weight_files(src: Path, dst: Path) -> None:
    """Copy a model folder's whole non-weight tree (config, tokenizer, and subfolders such as a
    sentence-transformers model's ``modules.json``, ``1_Pooling/``, ``2_Normalize/``), but not
    its weights: the top-level safetensors (and index, and pickles), nor other runtimes'."""
    from graftbuild.cache.hashing import iter_files

    for rel, p in iter_files(src, is_tracked):
        top, _, rest = rel.partition("/")
        if not rest:  # a top-level file
            if p.suffix == ".safetensors" or p.name == INDEX_NAME or p.suffix in PICKLE_SUFFIXES:
                continue
        elif top in _OTHER_WEIGHT_DIRS:
            continue
        if p.suffix in _OTHER_WEIGHTS:
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, target)


def plan_shards(infos: list[TensorInfo], shard_size: int) -> list[list[TensorInfo]]:
    """Split tensors, in order, into shards of at most ``shard_size`` bytes (a bigger tensor
    gets a shard of its own)."""
    shards: list[list[TensorInfo]] = [[]]
    used = 0
    for info in infos:
        if shards[-1] and used + info.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(info)
        used += info.nbytes
    return shards


@dataclass(frozen=True)
class Streamed:
    """A tensor handed to ``SafetensorsStreamWriter`` as its flat entries, piece by piece, in
    order, so that nothing tensor-sized is ever in memory (the streamed fuse: each piece is
    computed into a reused buffer, written, and its buffer computed into again).

    ``pieces`` yields contiguous CPU tensors of ``dtype``; a piece may be overwritten once the
    next one is asked for. The producer has checked every piece is finite (it alone can name the
    cause); the writer checks that the pieces add up to ``shape``."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: Iterator[torch.Tensor]


class SafetensorsStreamWriter:
    """Writes one safetensors file whose tensors (names, shapes, dtypes) are known in advance,
    taking their data one at a time, in the declared order."""

    def __init__(self, path: Path, infos: list[TensorInfo], metadata: dict[str, str]) -> None:
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        for info in infos:
            header[info.name] = {
                "dtype": info.dtype,
                "shape": list(info.shape),
                "data_offsets": [offset, offset + info.nbytes],
            }
            offset += info.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self._expected = [i for i in infos]
        # hashed as written, so committing the output does not read it back (writing.py)
        self._f = HashedWriter(path, size=8 + len(raw) + offset)
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)

    def write(self, name: str, tensor: torch.Tensor | Streamed) -> None:
        info = self._expected.pop(0)
        if info.name != name or tuple(tensor.shape) != info.shape:
            raise RuntimeError(f"stream writer expected {info.name} {info.shape}, got {name}")
        if torch_dtype_to_st(tensor.dtype) != info.dtype:
            raise RuntimeError(f"stream writer expected {info.dtype} for {name}")
        if isinstance(tensor, Streamed):
            written = 0
            for piece in tensor.pieces:  # each valid until the next is asked for
                self._f.write(piece.view(_byte_dtype()).numpy())
                written += piece.numel()
            if written != math.prod(info.shape):
                raise RuntimeError(f"stream writer got {written} entries of {name}, {info.shape}")
            return
        flat = tensor.detach().contiguous().cpu().reshape(-1)
        if not flat.is_floating_point() or flat.numel() == 0:
            self._f.write(flat.view(_byte_dtype()).numpy())  # no intermediate bytes copy
            return
        # checked and written piece by piece, each piece still in the CPU's cache for the
        # hash and the write (one pass over the tensor instead of two)
        step = max(1, WRITE_PIECE // flat.element_size())
        for lo in range(0, flat.numel(), step):
            piece = flat[lo : lo + step]
            if not all_finite(piece):
                check_finite(name, tensor)  # raises, counting over the whole tensor
            self._f.write(piece.view(_byte_dtype()).numpy())

    def close(self) -> None:
        if self._expected:
            self._f.close()
            raise RuntimeError(f"stream writer closed with {len(self._expected)} tensors unwritten")
        self._f.close()
        self._f.record()


def _byte_dtype() -> torch.dtype:
    import torch

    return torch.uint8


def write_model_weights(
    out: Path,
    infos: list[TensorInfo],
    tensors: Iterator[tuple[str, torch.Tensor | Streamed]],
    shard_size: int,
) -> list[Path]:
    """Stream tensors into ``model.safetensors`` or HF-style shards plus an index."""
    shards = plan_shards(infos, shard_size)
    n = len(shards)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    written: list[Path] = []
    for shard, fname in zip(shards, names, strict=True):
        writer = SafetensorsStreamWriter(out / fname, shard, {"format": "pt"})
        for _ in shard:
            name, tensor = next(tensors)
            writer.write(name, tensor)
            del tensor  # not alive while the next one is computed
        writer.close()
        written.append(out / fname)
    if n > 1:
        index = {
            "metadata": {"total_size": sum(i.nbytes for i in infos)},
            "weight_map": {
                i.name: fname for shard, fname in zip(shards, names, strict=True) for i in shard
            },
        }
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return written
