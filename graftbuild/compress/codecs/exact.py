"""``exact``: the float32 delta as-is. Used for norms, biases, and as the lossy codecs' fallback.

Parts: ``data`` (float32, the tensor's shape). Decode: ``data``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from graftbuild.compress.codecs._common import as_float32, exact_parts, not_low_rank, numel
from graftbuild.compress.codecs.base import (
    CodecParams,
    Encoded,
    FixedRate,
    RateProfile,
    label_params,
)

if TYPE_CHECKING:
    import torch

FALLBACK = "exact"  # value of meta["fallback"] when a lossy codec stored a tensor exactly


class ExactParams(CodecParams):
    """No parameters."""


def encode_exact(delta: torch.Tensor, meta: dict[str, Any] | None = None) -> Encoded:
    import torch

    from graftbuild.weights.memory import empty

    x = as_float32(delta)
    if x.device.type == "cpu" and x.is_contiguous():
        # The delta itself, no copy (3 GB saved per pack of a 3 GB model): the encoding shares
        # its memory, and callers drop the delta once it is encoded (they never modify it).
        return Encoded({"data": x}, dict(meta or {}))
    data = empty(4 * x.numel()).view(torch.float32).reshape(x.shape)  # cheap to fill
    data.copy_(x)
    return Encoded({"data": data}, dict(meta or {}))


def decode_exact(parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    import torch

    return parts["data"].to(torch.float32).reshape(shape)


class ExactCodec:
    name: ClassVar[str] = "exact"
    version: ClassVar[int] = 1
    Params: ClassVar[type[CodecParams]] = ExactParams
    uses_calibration: ClassVar[bool] = False

    def encode(self, delta: torch.Tensor, params: CodecParams) -> Encoded:
        return encode_exact(delta)

    def decode(
        self, parts: dict[str, torch.Tensor], meta: dict[str, Any], shape: tuple[int, ...]
    ) -> torch.Tensor:
        return decode_exact(parts, shape)

    def expected_nbytes(self, meta: dict[str, Any], shape: tuple[int, ...]) -> int:
        return 4 * numel(shape)

    def rate(
        self, name: str, delta: torch.Tensor, spec: dict[str, Any], weight: torch.Tensor | None
    ) -> RateProfile:
        return FixedRate(name, spec, tuple(delta.shape), 4 * delta.numel())

    def describe(self, entry: dict[str, Any]) -> dict[str, Any]:
        return {}

    def label(self, params: dict[str, Any]) -> str:
        return label_params(self.name, params)

    def lora_factors(self, reader: Any, name: str, entry: dict[str, Any]) -> str:
        return not_low_rank(self.name)

    def stored_parts(
        self, meta: dict[str, Any], shape: tuple[int, ...]
    ) -> dict[str, tuple[str, list[int]]]:
        return exact_parts(shape)

    def layout(
        self, params: CodecParams, shape: tuple[int, ...]
    ) -> tuple[dict[str, Any], dict[str, tuple[str, list[int]]]]:
        """(meta, part -> (safetensors dtype, shape)) of any delta of ``shape``, known before
        encoding, so the pack writer can write the file's header first (skillpack.plan_layout)."""
        return {}, exact_parts(shape)
