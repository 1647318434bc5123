"""``multislerp``: barycentric interpolation of any number of packs on the hypersphere
(mergekit's Multi-SLERP, goddard.blog/posts/multislerp-wow-what-a-cool-idea): project onto the
tangent space at the weighted mean direction, interpolate there, map back, rescale to the
weighted mean norm. Of the deltas from the base (``use_base``, default true) or the models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from graftbuild.fusion.mkbase import MergekitStrategy, delta_or_zero, model
from graftbuild.fusion.schedule import MergeParams, Param

if TYPE_CHECKING:
    import torch


class MultislerpParams(MergeParams):
    SPEC = (
        Param("weight", "float", "pack", required=True),
        Param("normalize_weights", "bool", "shared", True),
        Param("eps", "float", "shared", 1e-8),
        Param("use_base", "bool", "shared", True),
    )


class MultislerpStrategy(MergekitStrategy):
    name: ClassVar[str] = "multislerp"
    Params = MultislerpParams
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
        import torch

        use_base = bool(shared["use_base"])
        eps = float(shared["eps"])
        vecs = [delta_or_zero(base, d) if use_base else model(base, d) for d in deltas]
        if len(vecs) == 1:
            return base + vecs[0] if use_base else vecs[0]
        # mergekit's expressions, in place where the bytes allow (fewer k·n-sized buffers).
        w = torch.tensor([float(p["weight"]) for p in per], dtype=torch.float32)
        if shared["normalize_weights"]:
            w = w / w.sum()
        x = torch.stack(vecs).view(len(vecs), -1)
        norms = torch.norm(x, dim=-1, keepdim=True)
        units = x.div_(norms + eps)
        del x
        mean = (units * w.view(-1, 1)).sum(0)
        mean_norm = torch.norm(mean)
        if mean_norm < eps:
            if len(vecs) != 2:
                raise ValueError(
                    f"{tensor_name}: the weighted directions cancel out; change the weights"
                )
            out = (vecs[0].reshape(-1) * w[0] + vecs[1].reshape(-1) * w[1]).view(base.shape)
        else:
            del vecs
            mean = mean / mean_norm
            dots = (units * mean).sum(-1, keepdim=True)
            tangent = units.sub_(dots * mean)
            moved = tangent.mul_(w.view(-1, 1)).sum(0)
            del units, tangent
            tn = torch.norm(moved) + eps
            out = mean.mul_(torch.cos(tn)).add_(moved.mul_(torch.sin(tn) / tn))
            out = out.mul_((norms.squeeze(-1) * w).sum()).view(base.shape)
        return base + out if use_base else out
