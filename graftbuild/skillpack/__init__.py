"""The SkillPack file format (docs/SKILLPACK_FORMAT.md): ``format`` (constants, canonical JSON),
``writer`` (``PackWriter``, ``encode_tensor``), ``reader`` (``PackReader``) and ``report`` (what
``inspect`` shows). ``graftbuild.skillpack`` exposes the public names of all of them."""

from graftbuild.skillpack.format import (
    FORMAT_VERSION,
    METADATA_KEY,
    PACK_FILE,
    PART_SEP,
    SUPPORTED_MAJOR,
    canonical_json,
    part_key,
)
from graftbuild.skillpack.reader import PackReader
from graftbuild.skillpack.writer import (
    PackWriter,
    TensorLayout,
    encode_tensor,
    plan_layout,
    reference_layout,
    write_stored,
)

__all__ = [
    "FORMAT_VERSION",
    "METADATA_KEY",
    "PACK_FILE",
    "PART_SEP",
    "SUPPORTED_MAJOR",
    "PackReader",
    "PackWriter",
    "TensorLayout",
    "canonical_json",
    "encode_tensor",
    "part_key",
    "plan_layout",
    "reference_layout",
    "write_stored",
]
