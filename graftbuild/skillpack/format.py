"""The SkillPack v1 file: one fine-tune's compressed delta in one ``.safetensors`` file.

Every tensor of the delta is stored as its codec's parts, named ``"{tensor}::{part}"``; the
safetensors ``__metadata__`` key ``graftbuild.skillpack`` holds canonical JSON describing the
pack and each tensor (role, codec, params, shape, original dtype, codec metadata, part names).
docs/SKILLPACK_FORMAT.md is the specification; this module is one implementation of it.

The writer is hand-rolled (the safetensors layout is an 8-byte length, a JSON header and the raw
bytes) so that parts can be spilled to disk as they are added: a pack never has to fit in memory.
Bytes depend only on the content, not on the order of ``add`` calls.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from graftbuild.errors import UserError

PACK_FILE = "skillpack.safetensors"
"""The file a pack node's object holds."""

FORMAT_VERSION = "1.1"  # 1.1: the `zero` and `sparse` codecs, `added_rows`, the header's `vocab`
SUPPORTED_MAJOR = 1
REFERENCE_FORMAT_VERSION = "2.0"
"""A reference pack (a lossless delta stored as a pointer to its source, no payload: section 8
of docs/SKILLPACK_FORMAT.md). Major 2 so that a 1.x reader refuses it instead of misreading it;
stored packs are still written as 1.0."""
REFERENCE_MAJOR = 2
READABLE_MAJORS = (SUPPORTED_MAJOR, REFERENCE_MAJOR)
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
    return f"{name}{PART_SEP}{part}"


def parse_version(path: Path, version: Any) -> tuple[int, int]:
    match = VERSION_RE.match(version) if isinstance(version, str) else None
    if match is None:
        raise UserError(f"{path}: malformed SkillPack format_version {version!r}")
    return int(match.group(1)), int(match.group(2))
