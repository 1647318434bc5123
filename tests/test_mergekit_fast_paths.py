"""The faster forms of three mergekit methods give what mergekit's own operations give: sce's
variance and top-k mask, arcee_fusion's quartiles, karcher's loop into reused buffers, each bit
for bit against mergekit's expressions. The end-to-end agreement
with mergekit itself is tests/test_mergekit_parity.py; these reach the sizes (over 2²⁰ entries,
tied values at the cut) that its tiny models do not."""

from __future__ import annotations

import pytest
import torch

from graftbuild.fusion.arcee_fusion import ArceeFusionStrategy
from graftbuild.fusion.karcher import karcher_mean
from graftbuild.fusion.mkbase import sign_consensus
from graftbuild.fusion.sce import top_mask, variance


def _models(k: int, shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    return [base * 1.1 + torch.randn(shape, generator=g) * 0.002 for _ in range(k)]


@pytest.mark.parametrize(("k", "n"), [(2, 5000), (3, (1 << 20) + 777), (4, 999)])
def test_sce_variance_is_torch_var_bit_for_bit(k: int, n: int) -> None:
    tv = torch.stack(_models(k, (n,), seed=k))
    tv[1, :100] = tv[0, :100]  # zero variance
    tv[:, 100:200] = 1e-3  # equal across models
    ref = torch.var(tv, dim=0, unbiased=False)
    assert torch.equal(variance(tv), ref)
    assert torch.equal(variance(tv.view(k, n, 1)), ref.view(n, 1))


@pytest.mark.parametrize("n", [1000, (1 << 20) + 5])
def test_sce_top_mask_picks_what_topk_picks(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    mag = torch.rand(n, generator=g)
    for k in (0, 1, n // 3, n // 2, n):
        ref = torch.zeros(n)
        if k:
            ref[torch.topk(mag, k).indices] = 1
        assert torch.equal(top_mask(mag, k), ref), k
    # A tie straddling the cut: whichever tied entries topk keeps, the mask keeps.
    tied = mag.clone()
    order = tied.argsort(descending=True)
    tied[order[n // 2 - 3 : n // 2 + 3]] = float(tied[order[n // 2]])
    ref = torch.zeros(n)
    ref[torch.topk(tied, n // 2).indices] = 1
    assert torch.equal(top_mask(tied, n // 2), ref)
    assert int(top_mask(tied, n // 2).sum()) == n // 2


def _karcher_loop(tensors: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """mergekit's karcher_merge_tensors as it is written (equal weights, float32 tensors)."""
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [torch.linalg.vector_norm(t) for t in tensors]
    units = [
        torch.zeros_like(t) if n.item() == 0 else t / n for t, n in zip(tensors, norms, strict=True)
    ]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    alph = [alphas[i] / sum(alphas[j] for j in valid) for i in valid]
    us = [units[i] for i in valid]
    mean = sum(a * u for a, u in zip(alph, us, strict=True))
    mean = mean / torch.linalg.vector_norm(mean)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(alph, us, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tn = torch.linalg.vector_norm(tangent)
        if tn.item() < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)
        mean = mean / torch.linalg.vector_norm(mean)
    return sum(a * n for a, n in zip(alphas, norms, strict=True)) * mean


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("spread", [0.002, 0.5])
def test_karcher_reused_buffers_give_the_loops_bytes(k: int, spread: float) -> None:
    g = torch.Generator().manual_seed(k)
    base = torch.randn(300, 40, generator=g)
    models = [base + spread * torch.randn(300, 40, generator=g) for _ in range(k)]
    assert torch.equal(karcher_mean(models, 10, 1e-5), _karcher_loop(models, 10, 1e-5))
    # A zero model is left out of the mean but counts in the scale, as in mergekit.
    with_zero = [*models, torch.zeros_like(base)]
    assert torch.equal(karcher_mean(with_zero, 10, 1e-5), _karcher_loop(with_zero, 10, 1e-5))
    assert torch.equal(karcher_mean([models[0]], 10, 1e-5), models[0])
    assert torch.equal(karcher_mean([torch.zeros(5), torch.zeros(5)], 10, 1e-5), torch.zeros(5))


@pytest.mark.parametrize("shape", [(64, 50), (1100, 1000)])
def test_arcee_fusion_quartiles_are_the_sorted_samples(shape: tuple[int, int]) -> None:
    """The kthvalue quartiles select what the sorted (sampled) importance gives, bit for bit."""
    import torch.nn.functional as F

    from graftbuild.fusion.schedule import generator

    base, theta1 = _models(2, shape, seed=shape[0])
    out = ArceeFusionStrategy().merge(base, [theta1 - base], {}, [{}], "lm_head.weight", 7)
    d = theta1 - base
    t1 = base + d
    p, q = F.softmax(t1, dim=-1) + 1e-8, F.softmax(base, dim=-1) + 1e-8
    importance = (t1 - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    flat = importance.reshape(-1)
    if flat.numel() > 1_000_000:
        flat = flat[
            torch.randint(flat.numel(), (1_000_000,), generator=generator(7, "lm_head.weight", 0))
        ]
    s = flat.sort().values
    q1, med, q3 = (s[int(f * (s.numel() - 1))] for f in (0.25, 0.5, 0.75))
    mask = importance >= med + 1.5 * (q3 - q1)
    assert 0 < int(mask.sum()) < mask.numel()
    assert torch.equal(out, base + (t1 - base) * mask.float())


@pytest.mark.parametrize("k", [1, 2, 3])
def test_sign_election_in_place_is_mergekits_mask(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    stacked = torch.randn(k, 4000, generator=g)
    stacked[:, :100] = 0  # zero entries, and sums of exactly zero (which elect +)
    if k > 1:
        stacked[1, 100:200] = -stacked[0, 100:200]
        stacked[2 % k, 200:300] = float("nan")
    majority = (stacked.sum(dim=0) >= 0).to(stacked.dtype) * 2 - 1
    ref = (stacked.sign() == majority).to(stacked.dtype)
    before = stacked.clone()
    assert torch.equal(sign_consensus(stacked), ref)
    assert torch.equal(stacked.nan_to_num(7.0), before.nan_to_num(7.0))  # input untouched
