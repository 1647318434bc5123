"""``slerp``: spherical linear interpolation between the base (t = 0) and one pack's model
(t = 1), over each tensor flattened (Shoemake 1985; mergekit's ``slerp``). Nearly collinear
tensors (|cos| > 0.9995) interpolate linearly."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from graftbuild.fusion.mkbase import MergekitStrategy, model
from graftbuild.fusion.schedule import MergeParams, Param

if TYPE_CHECKING:
    import torch


class SlerpParams(MergeParams):
    SPEC = (Param("t", "float", "shared", required=True),)


def slerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, threshold: float = 0.9995, eps: float = 1e-8
) -> torch.Tensor:
    import math

    import torch

    a, b = v0.reshape(-1), v1.reshape(-1)
    na = float(torch.linalg.vector_norm(a))
    nb = float(torch.linalg.vector_norm(b))
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    dot = max(-1.0, min(1.0, float(torch.dot(a / na, b / nb))))
    if abs(dot) > threshold:
        ca, cb = 1 - t, t
    else:
        theta = math.acos(dot)
        s = math.sin(theta)
        ca, cb = math.sin((1 - t) * theta) / s, math.sin(t * theta) / s
    return (v0 * ca + v1 * cb).reshape(v0.shape)


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
