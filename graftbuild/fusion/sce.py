"""``sce``: Select, Calculate, Erase (FuseChat, Wan et al. 2024, arXiv 2408.07990): keep the
``select_topk`` fraction of entries where the packs' deltas vary most, weight each delta by its
mean square (normalised), erase entries against the elected sign, take the weighted mean."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from graftbuild.fusion.mkbase import MergekitStrategy, delta_or_zero, sign_consensus
from graftbuild.fusion.schedule import MergeParams, Param

if TYPE_CHECKING:
    import torch


class SceParams(MergeParams):
    SPEC = (
        Param("int8_mask", "bool", "shared", False),  # accepted; no effect on the result
        Param("select_topk", "float", "shared", 1.0),
    )


class SceStrategy(MergekitStrategy):
    name: ClassVar[str] = "sce"
    Params = SceParams

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

        tv = torch.stack([delta_or_zero(base, d) for d in deltas])
        topk = float(shared["select_topk"])
        if topk < 1:
            var = torch.var(tv, dim=0, unbiased=False)
            k = int(int(torch.count_nonzero(var)) * topk) if topk > 0 else 0
            mask = torch.zeros_like(var)
            if k > 0:
                mask.view(-1)[torch.topk(var.abs().view(-1), k=k).indices] = 1
            tv = tv * mask.unsqueeze(0)
        erase = sign_consensus(tv)
        w = tv.square().reshape(tv.shape[0], -1).mean(dim=1)
        total = float(w.sum())
        w = torch.ones_like(w) / w.shape[0] if abs(total) < 1e-6 else w / total
        w = w.view(-1, *([1] * base.dim())) * erase
        merged = (tv * w).sum(dim=0) / w.sum(dim=0).clamp(min=1e-6)
        return base + merged
