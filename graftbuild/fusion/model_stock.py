"""``model_stock``: Model Stock (Jang et al. 2024, arXiv 2403.19522): interpolate between the
base and the packs' average by t = k·cosθ / (1 + (k − 1)·cosθ), θ the mean angle between the
packs' deltas, per tensor (or per row, ``filter_wise``). Needs two packs or more."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from graftbuild.fusion.mkbase import MergekitStrategy, delta_or_zero
from graftbuild.fusion.schedule import MergeParams, Param

if TYPE_CHECKING:
    import torch


class ModelStockParams(MergeParams):
    SPEC = (Param("filter_wise", "bool", "shared", False),)


class ModelStockStrategy(MergekitStrategy):
    name: ClassVar[str] = "model_stock"
    Params = ModelStockParams
    needs_models = True
    min_packs = 2

    def merge(
        self,
        base: torch.Tensor,
        deltas: list[torch.Tensor | None],
        shared: dict[str, Any],
        per: list[dict[str, Any]],
        tensor_name: str,
        seed: int,
    ) -> torch.Tensor:
        import torch

        shape = base.shape
        if shared["filter_wise"]:
            w0 = base.unsqueeze(0) if base.dim() == 1 else base
        else:
            w0 = base.reshape(-1)
        offs = [delta_or_zero(base, d).reshape(w0.shape) for d in deltas]
        cos = []
        for i, a in enumerate(offs):
            for b in offs[i + 1 :]:
                norm = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
                cos.append(((a * b).sum(dim=-1) / norm.clamp(min=1e-6)).clamp(-1, 1))
        c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
        k = len(offs)
        den = 1 + (k - 1) * c
        singular = den.abs() < 1e-6
        t = torch.where(singular, torch.zeros_like(c), (k * c) / torch.where(singular, 1, den))
        average = sum(w0 + o for o in offs) / k
        return (t * average + (1 - t) * w0).reshape(shape)
