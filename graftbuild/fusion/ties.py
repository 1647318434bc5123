"""``ties``: TIES-merging (Yadav et al. 2023, arXiv 2306.01708): trim, elect sign, merge.

Two rules, chosen by ``rule``:

- ``"mergekit"`` (the default, mergekit's ``ties``): each Δᵢ keeps its ``int(density · n)``
  largest-magnitude entries (at least one), is multiplied by ``weight``, the sign of an entry is
  elected by the sum of the weighted entries (a sum of 0 elects +), and the agreeing entries are
  summed and divided by the sum of their weights (``normalize``, default true), times ``lambda``.
- ``"graftbuild"`` (graftbuild's rule before mergekit parity): each ``wᵢ Δᵢ`` keeps its
  ``round(density · n)`` entries (the count nearest the requested fraction; equal magnitudes at
  the threshold go to the lower index, so the kept set does not depend on the sort
  implementation), a sum of 0 elects no sign, and the merged entry is the plain mean of the
  agreeing entries, times ``lambda`` (or its older name ``scale``). Its density defaults to 0.2.
  Kept for recipes written against it: their bytes stay the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import model_validator

from graftbuild.fusion.mkbase import kth_largest
from graftbuild.fusion.schedule import MergeParams, Param
from graftbuild.fusion.task_arithmetic import GeneralizedTaskArithmetic, gta_spec
from graftbuild.weights.memory import empty_like

if TYPE_CHECKING:
    import torch


class TiesParams(MergeParams):
    SPEC = (
        *(
            p if p.name != "density" else Param("density", "float", "pack", None)
            for p in gta_spec(normalize=True, rescale=False)
        ),
        Param("rule", "str", "shared", "mergekit"),
        Param("scale", "float", "shared", None),
    )

    @model_validator(mode="after")
    def _ties(self) -> TiesParams:
        extra = self.model_extra or {}
        if extra.get("rule", "mergekit") not in ("mergekit", "graftbuild"):
            raise ValueError("rule: expected 'mergekit' or 'graftbuild'")
        if "scale" in extra and "lambda" in extra:
            raise ValueError("give `lambda` or its older name `scale`, not both")
        for name in ("density",):
            v = extra.get(name)
            if isinstance(v, int | float) and not 0 < v <= 1:
                raise ValueError(f"{name}: must be in (0, 1] (got {v!r})")
        return self


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ``round(density · numel)`` largest-magnitude entries zeroed (at
    least one kept); equal magnitudes at the threshold go to the lower index. In place: pass a
    tensor that may be overwritten."""
    import torch

    n = delta.numel()
    k = max(1, round(density * n))
    if k >= n:
        return delta
    flat = delta.view(-1)
    mag = torch.abs(flat, out=empty_like(flat))
    threshold = kth_largest(mag, k)
    drop = torch.lt(mag, threshold, out=empty_like(mag, torch.bool))
    kept = n - int(torch.count_nonzero(drop))  # >= k: the threshold's ties are all still in
    if kept > k:  # drop the surplus ties, highest index first
        ties = (mag == threshold).nonzero().squeeze(1)
        drop[ties[ties.numel() - (kept - k) :]] = True
    del mag
    return flat.masked_fill_(drop, 0).view_as(delta)


class TiesStrategy(GeneralizedTaskArithmetic):
    name: ClassVar[str] = "ties"
    version: ClassVar[int] = 3  # 3: mergekit's rule by default; 2: threshold ties, lower index
    Params = TiesParams
    sparsification = "magnitude"
    consensus = True

    def merge(
        self,
        base: torch.Tensor,
        deltas: list[torch.Tensor | None],
        shared: dict[str, Any],
        per: list[dict[str, Any]],
        tensor_name: str,
        seed: int,
    ) -> torch.Tensor:
        if shared["scale"] is not None:
            shared = shared | {"lambda": shared["scale"]}
        if shared["rule"] == "graftbuild":
            density = [0.2 if p["density"] is None else float(p["density"]) for p in per]
            w = [float(p["weight"]) for p in per]
            return graftbuild_ties(base, deltas, w, density, float(shared["lambda"]))
        per = [p | {"density": 1.0 if p["density"] is None else p["density"]} for p in per]
        return super().merge(base, deltas, shared, per, tensor_name, seed)


def graftbuild_ties(
    base: torch.Tensor,
    deltas: list[torch.Tensor | None],
    weights: list[float],
    density: list[float],
    scale: float,
) -> torch.Tensor:
    """graftbuild's rule. Works in a few tensors of its own, allocated through
    ``memory.empty_like`` (filling fresh memory is the largest cost on a CPU), reused in place."""
    import torch

    trimmed = [
        trim(torch.mul(d, w, out=empty_like(d)), dens)
        for d, w, dens in zip(deltas, weights, density, strict=True)
        if d is not None
    ]
    if not trimmed:
        return base.clone()
    sign = (
        trimmed[0].clone() if len(trimmed) == 1 else torch.add(*trimmed[:2], out=empty_like(base))
    )
    for t in trimmed[2:]:
        sign.add_(t)
    sign.sign_()
    sign.masked_fill_(sign == 0, float("nan"))  # no elected sign: nothing agrees with NaN
    merged = empty_like(base).zero_()
    count = empty_like(base).zero_()
    agree = empty_like(base)
    for t in trimmed:
        torch.sign(t, out=agree).eq_(sign)  # 1.0 where t is nonzero with the elected sign
        merged.add_(t.mul_(agree))
        count.add_(agree)
    del agree, sign, trimmed
    merged.div_(count.clamp_(min=1))
    return merged.mul_(scale).add_(base)  # = base + scale * merged, bit for bit
