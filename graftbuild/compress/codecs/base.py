"""The codec contract.

A codec turns one float32 delta tensor into a handful of named *parts* (plain tensors stored in
the SkillPack file) plus JSON-able metadata, and back. Codecs are pure: the same delta and params
give the same bytes. Modules here import torch inside functions, not at import time: the
recipe validates codec parameters while planning, and a no-op plan must not pay for torch.
Each codec lives in one module of this package and is registered by name
in ``graftbuild/compress/codecs/__init__.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # torch is imported lazily so that planning a build never loads it
    import torch


class CodecParams(BaseModel):
    """Base class of a codec's parameters (strict: unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class Encoded:
    """One tensor's encoding: named parts (stored as-is) and metadata needed to decode."""

    parts: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())


class Codec(Protocol):
    """What every codec module provides (see exact.py for the smallest one)."""

    name: ClassVar[str]
    version: ClassVar[int]
    Params: ClassVar[type[CodecParams]]

    def encode(self, delta: torch.Tensor, params: CodecParams) -> Encoded:
        """Encode a float32 delta (any shape). Parts may share memory with ``delta`` (``exact``
        stores it as is), so callers must not modify ``delta`` once it is encoded."""
        ...

    def decode(
        self, parts: dict[str, torch.Tensor], meta: dict[str, Any], shape: tuple[int, ...]
    ) -> torch.Tensor:
        """Reconstruct the float32 delta of ``shape`` from the stored parts and metadata."""
        ...

    def expected_nbytes(self, meta: dict[str, Any], shape: tuple[int, ...]) -> int:
        """Payload size computed from the encoding's ranks, bits and kept entries alone."""
        ...


# Optional: a codec whose encoding's metadata and part shapes follow from the tensor's shape alone
# (``exact``) may also define
#
#     def layout(self, params, shape) -> tuple[dict, dict[str, tuple[str, list[int]]]] | None
#
# returning (meta, part name -> (safetensors dtype code, shape)). When every tensor of a pack has
# one, the pack writer writes the file's header first and each tensor's parts straight into place
# (graftbuild/skillpack.py), instead of spilling them and copying at the end.
