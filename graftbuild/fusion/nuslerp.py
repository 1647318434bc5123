"""``nuslerp``: SLERP of two packs with weights (t = w₂ / (w₁ + w₂)), of their deltas from the
base (``use_base``, default true; false: of the models themselves), over the flattened tensor
(``nuslerp_flatten``) or row by row (``nuslerp_row_wise``) — mergekit's NuSLERP."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from graftbuild.fusion.mkbase import MergekitStrategy, delta_or_zero, model
from graftbuild.fusion.schedule import MergeParams, Param

if TYPE_CHECKING:
    import torch


class NuslerpParams(MergeParams):
    SPEC = (
        Param("weight", "float", "pack", required=True),
        Param("nuslerp_row_wise", "bool", "shared", False),
        Param("nuslerp_flatten", "bool", "shared", True),
        Param("use_base", "bool", "shared", True),
    )


def nuslerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int, flatten: bool, eps: float = 1e-8
) -> torch.Tensor:
    import torch

    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


class NuslerpStrategy(MergekitStrategy):
    name: ClassVar[str] = "nuslerp"
    Params = NuslerpParams
    needs_models = True
    min_packs = max_packs = 2

    def merge(
        self,
        base: torch.Tensor,
        deltas: list[torch.Tensor | None],
        shared: dict[str, Any],
        per: list[dict[str, Any]],
        tensor_name: str,
        seed: int,
    ) -> torch.Tensor:
        w = [float(p["weight"]) for p in per]
        total = sum(w)
        t = 0.5 if abs(total) < 1e-6 else w[1] / total
        dim = 0 if shared["nuslerp_row_wise"] else -1
        flat = bool(shared["nuslerp_flatten"])
        if shared["use_base"]:
            d0, d1 = (delta_or_zero(base, d) for d in deltas)
            return base + nuslerp(t, d0, d1, dim, flat)
        return nuslerp(t, model(base, deltas[0]), model(base, deltas[1]), dim, flat)
