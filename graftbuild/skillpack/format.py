"""The SkillPack file: one fine-tune's compressed delta in one ``.safetensors`` file.

A stored pack (format 3.x) keeps each tensor's encoding as one run of bytes, a safetensors
``U8`` entry named after the tensor; its codec's parts lie in that run widest dtype first, then
by name, their dtypes and shapes following from the entry's codec metadata
(``Codec.stored_parts``). The safetensors ``__metadata__`` key ``graftbuild.skillpack`` holds
canonical JSON describing the pack and each tensor (role, codec, params, shape, original dtype,
codec metadata). Format 1.x (read only) stored each part as its own entry ``"{tensor}::{part}"``:
one safetensors entry of ~100 header bytes per part, more than half of a 1/64 pack of a small
model. docs/SKILLPACK_FORMAT.md is the specification; this module is one implementation of it.

The writer is hand-rolled (the safetensors layout is an 8-byte length, a JSON header and the raw
bytes) so that parts can be spilled to disk as they are added: a pack never has to fit in memory.
Bytes depend only on the content, not on the order of ``add`` calls.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from graftbuild.errors import UserError

PACK_FILE = "skillpack.safetensors"
"""The file a pack node's object holds."""

FORMAT_VERSION = "3.0"
"""Stored packs: one byte run per tensor (3.0). 1.1 (read only) added the `zero` and `sparse`
codecs, `added_rows` and the header's `vocab` to 1.0's one safetensors entry per part."""
SUPPORTED_MAJOR = 3
LEGACY_MAJOR = 1
"""Stored packs with one safetensors entry per part (``part_key``): still read."""
REFERENCE_FORMAT_VERSION = "2.0"
"""A reference pack (a lossless delta stored as a pointer to its source, no payload: section 8
of docs/SKILLPACK_FORMAT.md). Major 2 so that a 1.x reader refuses it instead of misreading it."""
REFERENCE_MAJOR = 2
READABLE_MAJORS = (LEGACY_MAJOR, REFERENCE_MAJOR, SUPPORTED_MAJOR)
METADATA_KEY = "graftbuild.skillpack"
PART_SEP = "::"
ADDED_ROWS = "added_rows"
"""The part holding a tensor's rows beyond the base's (a source's new tokens), stored exactly."""

VERSION_RE = re.compile(r"^(\d+)\.(\d+)$")
COPY_CHUNK = 16 << 20
UMASK = os.umask(0)
os.umask(UMASK)  # read once: mkstemp creates 0600 files, packs get the usual 0666 & ~umask


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, ASCII only, no NaN: equal content gives equal text."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def part_key(name: str, part: str) -> str:
    """The safetensors name of part ``part`` of tensor ``name`` in a 1.x pack."""
    return f"{name}{PART_SEP}{part}"


PartLayout = dict[str, tuple[str, list[int]]]
"""part -> (safetensors dtype, shape)."""


def stored_layout(entry: dict[str, Any]) -> PartLayout:
    """The parts a pack entry stores: its codec's ``stored_parts`` for the base's rows, plus
    ``added_rows`` (float32, whole) when the source added rows. ValueError for an unknown
    codec."""
    from graftbuild.compress.codecs import get_codec

    shape = tuple(int(d) for d in entry["shape"])
    rows = int(entry.get(ADDED_ROWS, 0))
    if rows:
        shape = (shape[0] - rows, *shape[1:])
    parts = dict(get_codec(entry["codec"]).stored_parts(entry.get("meta", {}), shape))
    if rows:
        parts[ADDED_ROWS] = ("F32", [rows, *shape[1:]])
    return {p: (tag, [int(d) for d in dims]) for p, (tag, dims) in parts.items()}


def run_offsets(parts: PartLayout) -> tuple[dict[str, tuple[int, int]], int]:
    """(part -> (begin, end) in the tensor's byte run, the run's length): widest dtype first,
    then by name, so that every part is aligned to its element size when the run is."""
    from graftbuild.weights.tensors import ST_ITEMSIZE

    out: dict[str, tuple[int, int]] = {}
    at = 0
    for part in sorted(parts, key=lambda p: (-ST_ITEMSIZE[parts[p][0]], p)):
        tag, shape = parts[part]
        n = ST_ITEMSIZE[tag] * math.prod(shape)
        out[part] = (at, at + n)
        at += n
    return out, at


def run_alignment(nbytes: int) -> int:
    """The largest of 8, 4, 2, 1 dividing ``nbytes``: the writer lays runs out by it, largest
    first, so that a run whose parts are all float32 or wider starts aligned for them."""
    for a in (8, 4, 2):
        if nbytes % a == 0:
            return a
    return 1


def parse_version(path: Path, version: Any) -> tuple[int, int]:
    match = VERSION_RE.match(version) if isinstance(version, str) else None
    if match is None:
        raise UserError(f"{path}: malformed SkillPack format_version {version!r}")
    return int(match.group(1)), int(match.group(2))
