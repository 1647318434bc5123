"""``zero``: a delta that is exactly zero (a tensor the fine-tune left bit-identical to the base).

The pack step picks it for any all-zero delta whatever the role's codec, so such a tensor costs
its entry in the header and no data: a LoRA fine-tune leaves most tensors untouched, and a
source identical to its base packs to a few kilobytes. No parts. Decode: zeros of ``shape``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from graftbuild.compress.codecs.base import CodecParams, Encoded, FixedRate, RateProfile

if TYPE_CHECKING:
    import torch


class ZeroParams(CodecParams):
    """No parameters."""


class ZeroCodec:
    name: ClassVar[str] = "zero"
    version: ClassVar[int] = 1
    Params: ClassVar[type[CodecParams]] = ZeroParams
    uses_calibration: ClassVar[bool] = False

    def encode(self, delta: torch.Tensor, params: CodecParams) -> Encoded:
        if bool(delta.any()):
            raise ValueError("the zero codec encodes only an all-zero delta")
        return Encoded({}, {})

    def decode(
        self, parts: dict[str, torch.Tensor], meta: dict[str, Any], shape: tuple[int, ...]
    ) -> torch.Tensor:
        import torch

        return torch.zeros(shape, dtype=torch.float32)

    def expected_nbytes(self, meta: dict[str, Any], shape: tuple[int, ...]) -> int:
        return 0

    def rate(
        self, name: str, delta: torch.Tensor, spec: dict[str, Any], weight: torch.Tensor | None
    ) -> RateProfile:
        return FixedRate(name, spec, tuple(delta.shape), 0)

    def describe(self, entry: dict[str, Any]) -> dict[str, Any]:
        return {}

    def label(self, params: dict[str, Any]) -> str:
        return self.name

    def lora_factors(self, reader: Any, name: str, entry: dict[str, Any]) -> str:
        return "its delta is zero"

    def stored_parts(
        self, meta: dict[str, Any], shape: tuple[int, ...]
    ) -> dict[str, tuple[str, list[int]]]:
        return {}

    def layout(
        self, params: CodecParams, shape: tuple[int, ...]
    ) -> tuple[dict[str, Any], dict[str, tuple[str, list[int]]]]:
        return {}, {}


def is_zero(delta: torch.Tensor) -> bool:
    """True when every entry of ``delta`` is zero (the pack step then stores it as ``zero``)."""
    return not bool(delta.any())
