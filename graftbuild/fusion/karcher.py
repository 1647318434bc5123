"""``karcher``: the Karcher (Riemannian) mean of the packs' models on the unit hypersphere,
rescaled to their mean norm (Karcher 1977; mergekit's ``karcher``), equal weights; iterates at
most ``max_iter`` times until the tangent step is below ``tol``."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

from graftbuild.fusion.mkbase import MergekitStrategy, model
from graftbuild.fusion.schedule import MergeParams, Param

if TYPE_CHECKING:
    import torch


class KarcherParams(MergeParams):
    SPEC = (Param("max_iter", "int", "shared", 10), Param("tol", "float", "shared", 1e-5))


def karcher_mean(tensors: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """mergekit's ``karcher_merge_tensors`` (equal weights), computed in the models' span.

    Every iterate of mergekit's loop (the start, each tangent, each new mean) is a linear
    combination of the unit models uᵢ = θᵢ/‖θᵢ‖, and each quantity it reads (dot products,
    norms) is a quadratic form in the coefficients. So the loop runs on k coefficients and the
    k×k Gram matrix of the models (float64), and the tensors are read twice: once for the Gram
    matrix, once for the final combination. mergekit makes up to ``max_iter`` float32 passes
    over every model instead; the results agree to float32 rounding (the parity tests' 1e-4).
    """
    import torch

    k = len(tensors)
    if k == 1:
        return tensors[0]
    flat = [t.reshape(-1) for t in tensors]
    gram = torch.empty(k, k, dtype=torch.float64)
    for i in range(k):
        for j in range(i, k):
            gram[i, j] = gram[j, i] = _dot64(flat[i], flat[j])
    norms = gram.diagonal().clamp(min=0).sqrt()
    alphas = [1.0 / k] * k
    valid = [i for i in range(k) if float(norms[i]) > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    # The Gram matrix of the valid unit models; coefficients are over them.
    nv = norms[valid]
    g = gram[valid][:, valid] / (nv[:, None] * nv[None, :])
    a_sum = sum(alphas[i] for i in valid)
    alph = torch.tensor([alphas[i] / a_sum for i in valid], dtype=torch.float64)

    def norm(c: torch.Tensor) -> float:
        return float(c @ g @ c).__abs__() ** 0.5

    mean = alph.clone()
    mn = norm(mean)
    if mn < tol:
        mean = torch.zeros_like(alph)
        mean[0] = 1.0
    else:
        mean = mean / mn
    for _ in range(max_iter):
        dots = (g @ mean).clamp(-1.0, 1.0)  # ⟨mean, uᵢ⟩
        tangent = torch.zeros_like(mean)
        for i in range(len(valid)):
            theta = float(torch.arccos(dots[i]))
            if theta < tol:
                continue
            c = float(alph[i]) * theta / math.sin(theta)
            tangent[i] += c  # c · (uᵢ − ⟨mean, uᵢ⟩ · mean)
            tangent -= c * float(dots[i]) * mean
        tn = norm(tangent)
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * (tangent / tn)
        un = norm(mean)
        if un > tol:
            mean = mean / un
    scale = sum(a * float(n) for a, n in zip(alphas, norms, strict=True))
    out = torch.zeros_like(tensors[0])
    for c, i in zip(mean.tolist(), valid, strict=True):
        out.add_(tensors[i], alpha=scale * c / float(norms[i]))
    return out


_CHUNK = 1 << 20  # entries converted to float64 at a time


def _dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """⟨a, b⟩ accumulated in float64 (the tensors are float32; slices keep the copies small)."""
    import torch

    total = 0.0
    for s in range(0, a.numel(), _CHUNK):
        total += float(torch.dot(a[s : s + _CHUNK].double(), b[s : s + _CHUNK].double()))
    return total


class KarcherStrategy(MergekitStrategy):
    name: ClassVar[str] = "karcher"
    version: ClassVar[int] = 2  # 2: the loop in the models' span (float64 Gram matrix)
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
