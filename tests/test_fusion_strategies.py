"""TIES and DARE: the per-tensor rules, their determinism, and fusing through a recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import load_weights, make
from hypothesis import given, settings
from hypothesis import strategies as st

from graftbuild.errors import UserError
from graftbuild.fusion import get_strategy
from graftbuild.fusion.dare import DareParams, drop_and_rescale, mask_seed
from graftbuild.fusion.ties import TiesParams, kth_largest, trim
from graftbuild.recipe import load_recipe


def test_ties_elects_signs_and_takes_disjoint_mean() -> None:
    ties = get_strategy("ties")
    base = torch.zeros(4)
    d1 = torch.tensor([2.0, -1.0, 3.0, 0.0])
    d2 = torch.tensor([4.0, 3.0, -1.0, 0.0])
    out = ties.combine(
        base, [d1, d2, None], [1.0, 1.0, 1.0], TiesParams(rule="graftbuild", density=1.0), "w"
    )
    # entry 0: both positive -> mean 3; entry 1: sum +2 -> only d2 agrees -> 3;
    # entry 2: sum +2 -> only d1 agrees -> 3; entry 3: nobody -> 0.
    torch.testing.assert_close(out, torch.tensor([3.0, 3.0, 3.0, 0.0]))
    half = ties.combine(
        base, [d1], [1.0], TiesParams(rule="graftbuild", density=0.5, scale=2.0), "w"
    )
    torch.testing.assert_close(half, torch.tensor([4.0, 0.0, 6.0, 0.0]))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.floats(0.05, 1.0), st.integers(0, 2**31))
def test_trim_keeps_the_largest_fraction(n: int, density: float, seed: int) -> None:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    t = trim(x, density)
    k = max(1, round(density * n))
    assert int((t != 0).sum()) == min(k, n)
    kept = x.abs()[t != 0]
    dropped = x.abs()[t == 0]
    if len(dropped) and len(kept):
        assert kept.min() >= dropped.max()


def test_trim_breaks_ties_at_the_threshold_towards_the_lower_index() -> None:
    x = torch.tensor([1.0, 3.0, -2.0, 2.0, 2.0, -2.0, 0.5])
    assert trim(x.clone(), 3 / 7).tolist() == [0.0, 3.0, -2.0, 2.0, 0.0, 0.0, 0.0]


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31), st.floats(0.01, 1.0), st.booleans())
def test_kth_largest_of_a_large_tensor_is_exact(seed: int, fraction: float, coarse: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    mag = torch.randn(1_100_000, generator=gen).abs()
    if coarse:  # many equal values
        mag = torch.round(mag * 8) / 8
    k = max(1, round(fraction * mag.numel()))
    assert kth_largest(mag, k) == torch.kthvalue(mag, mag.numel() - k + 1).values


def test_ties_on_large_tensors_matches_the_textbook_rule() -> None:
    """The in-place implementation against the rule written out with stacks (two packs: the
    same sums in the same order, so the same bits)."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(1200, 1000, generator=gen)
    deltas = [torch.randn(1200, 1000, generator=gen) for _ in range(2)]
    weights, density = [1.0, 0.5], 0.2
    out = get_strategy("ties").combine(
        base, deltas, weights, TiesParams(rule="graftbuild", density=density, scale=0.7), "w"
    )
    trimmed = []
    for d, w in zip(deltas, weights, strict=True):
        x = (d * w).reshape(-1)
        k = round(density * x.numel())
        keep = torch.zeros_like(x, dtype=torch.bool)
        keep[torch.topk(x.abs(), k).indices] = True
        trimmed.append((x * keep).view_as(d))
    stack = torch.stack(trimmed)
    sign = torch.sign(stack.sum(dim=0))
    agree = (torch.sign(stack) == sign) & (stack != 0)
    merged = (stack * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    assert torch.equal(out, base + 0.7 * merged)


def test_ties_single_pack_full_density_is_the_sum() -> None:
    base, d = torch.randn(5, 7), torch.randn(5, 7)
    out = get_strategy("ties").combine(
        base, [d], [0.5], TiesParams(rule="graftbuild", density=1.0), "w"
    )
    torch.testing.assert_close(out, base + 0.5 * d)


def test_dare_is_seeded_by_tensor_name_and_unbiased() -> None:
    d = torch.ones(200, 200)
    a = drop_and_rescale(d, 0.9, mask_seed(0, "x.weight", 0))
    assert torch.equal(a, drop_and_rescale(d, 0.9, mask_seed(0, "x.weight", 0)))
    assert not torch.equal(a, drop_and_rescale(d, 0.9, mask_seed(0, "y.weight", 0)))
    assert not torch.equal(a, drop_and_rescale(d, 0.9, mask_seed(1, "x.weight", 0)))
    assert not torch.equal(a, drop_and_rescale(d, 0.9, mask_seed(0, "x.weight", 1)))
    kept = a != 0
    assert 0.08 < kept.float().mean() < 0.12
    torch.testing.assert_close(a[kept], torch.full_like(a[kept], 10.0))
    assert abs(a.mean().item() - 1.0) < 0.1
    dare = get_strategy("dare")
    base = torch.randn(3, 3)
    torch.testing.assert_close(
        dare.combine(base, [d[:3, :3], None], [2.0, 1.0], DareParams(drop=0.0), "w"),
        base + 2.0,
    )


RECIPE = """
[project]
name = "s"

[base]
path = "models/base"

[sources.x]
path = "models/x"

[sources.y]
path = "models/y"

[[fuse]]
name = "t"
packs = ["x", "y"]
strategy = "ties"
options = {{ {ties} }}

[[fuse]]
name = "d"
packs = ["x", "y"]
strategy = "dare"
options = {{ {dare} }}
"""


def test_ties_and_dare_fuse_through_a_recipe(path_project: Path) -> None:
    path_project.write_text(RECIPE.format(ties="density = 0.3", dare="drop = 0.5, seed = 7"))
    first = make(path_project)
    t1 = load_weights(first.node("fuse:t").output)
    d1 = load_weights(first.node("fuse:d").output)
    base = load_weights(path_project.parent / "models" / "base")
    assert set(t1) == set(base) == set(d1)
    assert any(not torch.equal(t1[n], base[n]) for n in base)
    assert any(not torch.equal(t1[n], d1[n]) for n in base)
    # Deterministic: a fresh cache rebuilds the same bytes.
    again = make(path_project, cache=path_project.parent / "cache2")
    for n, v in load_weights(again.node("fuse:d").output).items():
        assert torch.equal(v, d1[n])
    # The seed is part of the key: another seed rebuilds only that fuse.
    path_project.write_text(RECIPE.format(ties="density = 0.3", dare="drop = 0.5, seed = 8"))
    third = make(path_project)
    assert third.built == ["fuse:d"]
    assert any(
        not torch.equal(v, d1[n]) for n, v in load_weights(third.node("fuse:d").output).items()
    )


def test_bad_strategy_options_are_user_errors(path_project: Path) -> None:
    path_project.write_text(RECIPE.format(ties="density = 2.0", dare="drop = 0.5"))
    with pytest.raises(UserError, match="density"):
        load_recipe(path_project)
    path_project.write_text(RECIPE.format(ties="density = 0.5", dare="keep = 0.5"))
    with pytest.raises(UserError, match="keep"):
        load_recipe(path_project)


@pytest.mark.parametrize("present", [(True, True), (False, True), (True, False), (False, False)])
def test_sum_streaming_forms_give_combines_bytes(present: tuple[bool, bool]) -> None:
    # The fuse step streams ``sum`` through fold_first/fold; its bytes must be combine's.
    from graftbuild.fusion.sum import SumStrategy

    g = torch.Generator().manual_seed(7)
    base = torch.randn(33, 17, generator=g)
    deltas = [torch.randn(33, 17, generator=g) * 1e-3 if p else None for p in present]
    weights = [0.7, -1.3]
    strategy = SumStrategy()
    params = strategy.Params()
    expected = strategy.combine(base, deltas, weights, params, "w")
    acc = None
    for delta, w in zip(deltas, weights, strict=True):
        if delta is None:
            continue
        if acc is None:
            acc = strategy.fold_first(base, delta, w, params, "w", torch.empty_like(base))
        else:
            acc = strategy.fold(acc, delta, w, params, "w")
    got = base.clone() if acc is None else acc
    assert torch.equal(got, expected)
    assert torch.equal(base, torch.randn(33, 17, generator=torch.Generator().manual_seed(7)))
