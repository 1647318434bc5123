"""``task_arithmetic``: θ + λ Σ wᵢ Δᵢ (Ilharco et al. 2022, arXiv 2212.04089), mergekit's
parameters; also the generalized form the ``ties``/``dare_*``/``breadcrumbs*``/``della*``
strategies specialise: sparsify each Δᵢ, weight it, optionally elect signs, sum, normalise."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from graftbuild.fusion.mkbase import MergekitStrategy, delta_or_zero, sign_consensus, sparsify
from graftbuild.fusion.schedule import MergeParams, Param

if TYPE_CHECKING:
    import torch


def gta_spec(normalize: bool, rescale: bool, extra: tuple[Param, ...] = ()) -> tuple[Param, ...]:
    return (
        Param("int8_mask", "bool", "shared", False),  # accepted; no effect on the result
        Param("normalize", "bool", "shared", normalize),
        Param("rescale", "bool", "shared", rescale),
        Param("lambda", "float", "shared", 1.0),
        Param("weight", "float", "pack", required=True),
        Param("density", "float", "pack", 1.0),
        *extra,
    )


class GeneralizedTaskArithmetic(MergekitStrategy):
    sparsification: ClassVar[str | None] = None
    consensus: ClassVar[bool] = False

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

        if not deltas:
            return base
        rescale = bool(shared["rescale"])
        weights = torch.tensor([float(p["weight"]) for p in per], dtype=torch.float32)
        ws = weights.view(-1, *([1] * base.dim()))
        if self.consensus:
            # One buffer of n sparsified deltas, masked in place (as few n-sized copies as
            # the sign election allows).
            stacked = torch.empty((len(deltas), *base.shape), dtype=torch.float32)
            for i, (d, p) in enumerate(zip(deltas, per, strict=True)):
                d = delta_or_zero(base, d)
                stacked[i] = sparsify(self.sparsification, d, p, rescale, seed, tensor_name, i)
            stacked.mul_(ws)
            mask = sign_consensus(stacked)
            mixed = stacked.mul_(mask).sum(dim=0)
            del stacked
            divisor = mask.mul_(ws).sum(dim=0)
            divisor[divisor == 0] = 1
            del mask
        else:
            # A running sum: one sparsified delta in memory at a time.
            mixed = torch.zeros_like(base)
            for i, (d, p) in enumerate(zip(deltas, per, strict=True)):
                if d is None:
                    continue
                s = sparsify(self.sparsification, d, p, rescale, seed, tensor_name, i)
                mixed.add_(s * weights[i])
            divisor = weights.sum()
            if divisor.abs() < 1e-8:
                divisor = torch.ones(())
        if shared["normalize"]:
            mixed = mixed / divisor
        lam = float(shared["lambda"])
        if lam != 1:
            mixed = mixed * lam
        return base + mixed


class TaskArithmeticParams(MergeParams):
    SPEC = gta_spec(normalize=False, rescale=False)


class TaskArithmeticStrategy(GeneralizedTaskArithmetic):
    name: ClassVar[str] = "task_arithmetic"
    Params = TaskArithmeticParams
