"""``arcee_fusion``: keep the pack's changes only where they matter (Arcee Fusion, arcee.ai):
importance = |Δ| · KL(softmax(θ₁) ‖ softmax(θ)) per row; entries at or above
median + 1.5 · IQR of the importance take the pack's value, the rest stay the base's. One pack.

The quartiles are exact up to 10⁶ entries, as mergekit's; above, mergekit samples 10⁶ entries
from the unseeded global RNG, and graftbuild samples the same number seeded by the tensor's
name (same bytes on every run)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from graftbuild.fusion.mkbase import MergekitStrategy, delta_or_zero
from graftbuild.fusion.schedule import MergeParams, generator

if TYPE_CHECKING:
    import torch

_SAMPLE = 1_000_000


class ArceeFusionParams(MergeParams):
    SPEC = ()


class ArceeFusionStrategy(MergekitStrategy):
    name: ClassVar[str] = "arcee_fusion"
    Params = ArceeFusionParams
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
        import torch
        import torch.nn.functional as F

        # mergekit's expressions, in place where the bytes allow (fewer tensor-sized temporaries).
        theta1 = base + delta_or_zero(base, deltas[0])
        p = F.softmax(theta1, dim=-1).add_(1e-8)
        ratio = F.softmax(base, dim=-1).add_(1e-8)  # q, then p / q, then p · log(p / q)
        torch.div(p, ratio, out=ratio)
        kl = torch.sum(ratio.log_().mul_(p), dim=-1, keepdim=True)
        del p, ratio
        diff = theta1.sub_(base)  # θ₁ − θ
        importance = diff.abs().mul_(kl)
        flat = importance.reshape(-1)
        if flat.numel() > _SAMPLE:
            idx = torch.randint(flat.numel(), (_SAMPLE,), generator=generator(seed, tensor_name, 0))
            flat = flat[idx]
        # The sorted sample's entries at three positions, by selection (mergekit sorts it all).
        n = flat.numel()
        q1, med, q3 = (torch.kthvalue(flat, int(f * (n - 1)) + 1).values for f in (0.25, 0.5, 0.75))
        mask = (importance >= med + 1.5 * (q3 - q1)).to(base.dtype)
        del importance, flat
        return base + diff.mul_(mask)
