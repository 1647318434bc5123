"""What the mergekit-named strategies share: binding per-pack settings, and the tensor operations
of mergekit's task-arithmetic family (sparsification, sign consensus).

Each strategy (one module per method) defines ``merge(base, deltas, shared, per, name, seed)``
on one tensor: ``base`` is θ's tensor in float32 (the strategy's own copy), ``deltas[i]`` pack
i's decoded Δ̂ᵢ or None (pack i leaves the tensor alone: Δ = 0), ``shared`` and ``per`` the
parameter values resolved for this tensor (``schedule.Bound.resolve``). Methods that work on the
models themselves use θᵢ = θ + Δ̂ᵢ, which is the source exactly (to float rounding) when the pack
is lossless (an all-``exact`` compression profile; the recipe checks this, see ``NEEDS_MODELS``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from graftbuild.fusion.schedule import Bound, MergeParams, generator, num_layers_of

if TYPE_CHECKING:
    import torch


class MergekitStrategy:
    name: ClassVar[str]
    version: ClassVar[int] = 1
    Params: ClassVar[type[MergeParams]]
    needs_models: ClassVar[bool] = False
    """True: the method reads θᵢ, not only Δᵢ (its packs must be lossless)."""
    min_packs: ClassVar[int] = 1
    max_packs: ClassVar[int | None] = None

    def bind(
        self,
        params: MergeParams,
        pack_options: list[dict[str, Any]],
        base_config: dict[str, Any],
        weights: list[float],
    ) -> Bound:
        """The options of one fuse with its packs' own settings and the base's layer count."""
        return Bound(params, pack_options, num_layers_of(base_config), list(weights))

    def combine(
        self,
        base: torch.Tensor,
        deltas: list[torch.Tensor | None],
        weights: list[float],
        params: Any,
        tensor_name: str,
    ) -> torch.Tensor:
        bound = params if isinstance(params, Bound) else Bound(params, [{}] * len(deltas), 0)
        if not bound.weights:
            bound.weights = list(weights)
        shared, per = bound.resolve(tensor_name)
        return self.merge(base, deltas, shared, per, tensor_name, bound.seed)

    def merge(
        self,
        base: torch.Tensor,
        deltas: list[torch.Tensor | None],
        shared: dict[str, Any],
        per: list[dict[str, Any]],
        tensor_name: str,
        seed: int,
    ) -> torch.Tensor:
        raise NotImplementedError


def delta_or_zero(base: torch.Tensor, d: torch.Tensor | None) -> torch.Tensor:
    import torch

    return torch.zeros_like(base) if d is None else d


def model(base: torch.Tensor, d: torch.Tensor | None) -> torch.Tensor:
    """θᵢ = θ + Δ̂ᵢ (a new tensor)."""
    return base.clone() if d is None else base + d


_EXACT_BELOW = 1 << 20  # entries: smaller tensors take torch.kthvalue directly
_SAMPLE = 1 << 16


def kth_largest(mag: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest value of a 1-D tensor (1 ≤ k ≤ numel), exactly, as a 0-d tensor.

    ``torch.kthvalue`` over a whole embedding (tens of millions of entries) takes seconds; a
    sorted, evenly strided sample brackets the answer instead, and only the entries inside the
    bracket (a few hundredths of the tensor) go through ``kthvalue``. Everything above the
    bracket is counted, so the answer is exact; a bracket that misses falls back to the whole.
    """
    import torch

    n = mag.numel()
    if n < _EXACT_BELOW:
        return torch.kthvalue(mag, n - k + 1).values
    sample = mag[:: n // _SAMPLE].sort(descending=True).values
    m = sample.numel()
    pos = k * m / n  # where the answer falls in the sample
    margin = 4 * pos**0.5 + 16
    hi = sample[max(0, int(pos - margin))]
    lo = sample[min(m - 1, int(pos + margin))]
    above = int(torch.count_nonzero(mag > hi))
    if above < k:
        inside = mag[(mag >= lo) & (mag <= hi)]
        want = k - above  # the answer is the want-th largest inside the bracket
        if want <= inside.numel():
            return torch.kthvalue(inside, inside.numel() - want + 1).values
    return torch.kthvalue(mag, n - k + 1).values


# --- sparsification (mergekit's ``sparsify``: one delta at a time) -----------------------------


def rescale_l1(tensor: torch.Tensor, masked: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``masked`` scaled back to ``tensor``'s L1 norm (mergekit's ``rescale``)."""
    before = tensor.abs().sum()
    after = masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def magnitude(delta: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep the ``max(1, int(density · n))`` largest-magnitude entries (mergekit's rule)."""
    import torch

    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    flat = delta.reshape(-1)
    mag = flat.abs()
    mask = torch.zeros_like(flat)
    threshold = kth_largest(mag, k)
    above = mag > threshold
    if int(above.sum()) + int((mag == threshold).sum()) == k:  # no tie straddles the cut
        mask[mag >= threshold] = 1
    else:  # which tied entries mergekit keeps is torch.argsort's choice: ask it
        mask[torch.argsort(mag, descending=True)[:k]] = 1
    del mag, above
    masked = (flat * mask).view_as(delta)
    return rescale_l1(delta, masked) if rescale else masked


def magnitude_outliers(
    delta: torch.Tensor, density: float, gamma: float, rescale: bool
) -> torch.Tensor:
    """Breadcrumbs: drop the ``gamma`` largest-magnitude fraction and the smallest, keeping
    ``int(density · n)`` entries."""
    import torch

    if density >= 1:
        return delta
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    flat = delta.reshape(-1)
    order = torch.sort(flat.abs()).indices
    mask = torch.zeros_like(flat)
    mask[order[n_bot : n_bot + target]] = 1
    masked = (flat * mask).view_as(delta)
    return rescale_l1(delta, masked) if rescale else masked


def bernoulli(
    delta: torch.Tensor, density: float, rescale: bool, gen: torch.Generator
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` (seeded)."""
    import torch

    if density >= 1:
        return delta
    mask = (torch.rand(delta.shape, generator=gen) < density).to(delta.dtype)
    masked = delta * mask
    return rescale_l1(delta, masked) if rescale else masked


def della_magprune(
    delta: torch.Tensor, density: float, epsilon: float, rescale: bool, gen: torch.Generator
) -> torch.Tensor:
    """DELLA's MagPrune: each row's entries kept with probabilities rising linearly with their
    magnitude rank, from ``density - epsilon`` to ``density + epsilon``."""
    import torch

    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError("epsilon must keep density ± epsilon inside (0, 1)")
    shape = delta.shape
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(torch.float32) + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    probs = (density - epsilon) + ((ranks - lo) / (hi - lo)).clamp(0, 1) * 2 * epsilon
    mask = (torch.rand(probs.shape, generator=gen) < probs).to(torch.float32)
    masked = rows * mask
    out = rescale_l1(rows, masked) if rescale else masked
    return out.reshape(shape)


def sparsify(
    method: str | None,
    delta: torch.Tensor,
    params: dict[str, Any],
    rescale: bool,
    seed: int,
    tensor_name: str,
    index: int,
) -> torch.Tensor:
    if method is None:
        return delta
    density = float(params["density"])
    if method == "magnitude":
        return magnitude(delta, density, rescale)
    if method == "magnitude_outliers":
        return magnitude_outliers(delta, density, float(params["gamma"]), rescale)
    gen = generator(seed, tensor_name, index)
    if method == "random":
        return bernoulli(delta, density, rescale, gen)
    if method == "della_magprune":
        return della_magprune(delta, density, float(params["epsilon"]), rescale, gen)
    raise ValueError(f"unknown sparsification {method!r}")


def sign_consensus(stacked: torch.Tensor) -> torch.Tensor:
    """TIES's election by mass: 1.0 where an entry's sign equals the sign of the entries' sum
    (a sum of 0 elects +), else 0.0."""
    majority = (stacked.sum(dim=0) >= 0).to(stacked.dtype).mul_(2).sub_(1)
    # sign − majority is 0 exactly where they are equal; in place, one n-sized buffer.
    return stacked.sign().sub_(majority).eq_(0)
