"""``slerp``: spherical linear interpolation between the base (t = 0) and one pack's model
(t = 1), over each tensor flattened (Shoemake 1985; mergekit's ``slerp``). Nearly collinear
tensors (|cos| > 0.9995) interpolate linearly."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from graftbuild.fusion.mkbase import MergekitStrategy, model
from graftbuild.fusion.schedule import MergeParams, Param

if TYPE_CHECKING:
    import torch


_CHUNK = 1024 * 1024


class SlerpParams(MergeParams):
    SPEC = (Param("t", "float", "shared", required=True),)


def slerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, threshold: float = 0.9995, eps: float = 1e-8
) -> torch.Tensor:
    """mergekit's arithmetic, in its order: norms and the dot product summed over chunks of
    2²⁰ entries, the angle in float32 (over tens of millions of entries the summation order
    shows at ~1e-4)."""
    import torch

    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    chunk = _CHUNK
    parts = range(0, a.shape[1], chunk)
    na = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(a[:, i : i + chunk], dim=1, keepdim=True)
                     for i in parts]), dim=0
    )  # fmt: skip
    nb = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(b[:, i : i + chunk], dim=1, keepdim=True)
                     for i in parts]), dim=0
    )  # fmt: skip
    na = torch.where(na > eps, na, 1)
    nb = torch.where(nb > eps, nb, 1)
    dot = torch.stack(
        [((a[:, i : i + chunk] / na) * (b[:, i : i + chunk] / nb)).sum(dim=1, keepdim=True)
         for i in parts]
    ).sum(dim=0).clamp(-1, 1)  # fmt: skip
    tt = torch.tensor([[t]], dtype=torch.float32)
    linear = dot.abs() > threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    s = torch.sin(theta)
    ca = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / s)
    cb = torch.where(linear, tt, torch.sin(tt * theta) / s)
    out = torch.empty_like(a)
    for i in parts:
        out[:, i : i + chunk] = ca * a[:, i : i + chunk] + cb * b[:, i : i + chunk]
    return out.reshape(v0.shape)


class SlerpStrategy(MergekitStrategy):
    name: ClassVar[str] = "slerp"
    Params = SlerpParams
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
        return slerp(float(shared["t"]), base, model(base, deltas[0]))
