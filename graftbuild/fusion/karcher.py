"""``karcher``: the Karcher (Riemannian) mean of the packs' models on the unit hypersphere,
rescaled to their mean norm (Karcher 1977; mergekit's ``karcher``), equal weights; iterates at
most ``max_iter`` times until the tangent step is below ``tol``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from graftbuild.fusion.mkbase import MergekitStrategy, model
from graftbuild.fusion.schedule import MergeParams, Param

if TYPE_CHECKING:
    import torch


class KarcherParams(MergeParams):
    SPEC = (Param("max_iter", "int", "shared", 10), Param("tol", "float", "shared", 1e-5))


def karcher_mean(tensors: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """mergekit's ``karcher_merge_tensors`` (equal weights), value for value.

    The same float32 operations in the same order as mergekit's loop (so the same bytes: on a
    32M-entry head mergekit's float32 dot products put the result ~3·10⁻⁴ from the exact mean,
    and agreeing with mergekit means agreeing with that), but into three reused buffers instead
    of five fresh tensors per model and iteration: most of the loop's time was allocating and
    first touching them.
    """
    import torch

    if len(tensors) == 1:
        return tensors[0]
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [torch.linalg.vector_norm(t) for t in tensors]
    units = [
        torch.zeros_like(t) if n.item() == 0 else t / n for t, n in zip(tensors, norms, strict=True)
    ]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    a_sum = sum(alphas[i] for i in valid)
    alph = [alphas[i] / a_sum for i in valid]
    us = [units[i] for i in valid]
    mean = torch.zeros_like(us[0])
    buf = torch.empty_like(mean)
    for a, u in zip(alph, us, strict=True):
        mean.add_(torch.mul(u, a, out=buf))  # mean += a * u
    mn = torch.linalg.vector_norm(mean)
    mean = us[0].clone() if mn.item() < tol else mean.div_(mn)
    tangent = torch.empty_like(mean)
    for _ in range(max_iter):
        tangent.zero_()
        for a, u in zip(alph, us, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            # tangent += a · (θ / sin θ) · (u − dot · mean)
            torch.sub(u, torch.mul(mean, dot, out=buf), out=buf)
            tangent.add_(buf.mul_(a * (theta / torch.sin(theta))))
        tn = torch.linalg.vector_norm(tangent)
        if tn.item() < tol:
            break
        # mean = cos(tn) · mean + sin(tn) · (tangent / tn)
        mean.mul_(torch.cos(tn)).add_(tangent.div_(tn).mul_(torch.sin(tn)))
        un = torch.linalg.vector_norm(mean)
        if un.item() > tol:
            mean.div_(un)
    scale = sum(a * n for a, n in zip(alphas, norms, strict=True))
    return mean.mul_(scale)


class KarcherStrategy(MergekitStrategy):
    name: ClassVar[str] = "karcher"
    Params = KarcherParams
    needs_models = True

    def merge(
        self,
        base: torch.Tensor,
        deltas: list[torch.Tensor | None],
        shared: dict[str, Any],
        per: list[dict[str, Any]],
        tensor_name: str,
        seed: int,
    ) -> torch.Tensor:
        models = [model(base, d) for d in deltas]
        return karcher_mean(models, int(shared["max_iter"]), float(shared["tol"]))
