"""``nearswap``: take the pack model's value where it is near the base's: weight
clamp(t / |θ₁ − θ|, 0, 1) towards θ₁ per entry (mergekit's NearSwap,
huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001). One pack."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from graftbuild.fusion.mkbase import MergekitStrategy, delta_or_zero
from graftbuild.fusion.schedule import MergeParams, Param

if TYPE_CHECKING:
    import torch


class NearswapParams(MergeParams):
    SPEC = (Param("t", "float", "shared", required=True),)


class NearswapStrategy(MergekitStrategy):
    name: ClassVar[str] = "nearswap"
    Params = NearswapParams
    needs_models = True
    min_packs = max_packs = 1

    def merge(
        self,
        base: torch.Tensor,
        deltas: list[torch.Tensor | None],
        shared: dict[str, Any],
        per: list[dict[str, Any]],
        tensor_name: str,
        seed: int,
    ) -> torch.Tensor:
        d = delta_or_zero(base, deltas[0])
        b = base + d
        weight = (float(shared["t"]) / (b - base).abs().clamp(min=1e-6)).clamp(min=0, max=1)
        return weight * b + (1 - weight) * base
