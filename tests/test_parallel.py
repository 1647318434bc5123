"""``-j``: tensors in parallel inside a node, the same bytes for any job count; ``--device``."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from graftbuild.build.engine import Engine
from graftbuild.cache.hashing import tree_hash_uncached
from graftbuild.cache.store import Store
from graftbuild.cli.app import main
from graftbuild.recipe import load_recipe
from graftbuild.steps.base import BuildSettings
from graftbuild.weights.parallel import ordered_map


def build(recipe: Path, cache: Path, jobs: int) -> dict[str, str]:
    """Content hash of every built node's output, built from scratch in ``cache``."""
    r = load_recipe(recipe)
    r.project.out = cache.with_name(cache.name + "-out")  # outputs may not lie in the cache
    result = Engine(r, Store(cache), BuildSettings(jobs=jobs)).make()
    return {n.id: n.output_hash for n in result.nodes if n.action == "built"}


def test_j1_and_j2_give_identical_bytes(path_project: Path, tmp_path: Path) -> None:
    # The default profile runs every codec kind: prune (embed/head), lowrank SVD (attn), mixed
    # SVD + quantisation (mlp), exact (norms); the fuse streams through the pool too.
    one = build(path_project, tmp_path / "j1", jobs=1)
    two = build(path_project, tmp_path / "j2", jobs=2)
    assert {"pack:x", "pack:y", "fuse:release"} <= set(one)
    assert one == two
    fused = tmp_path / "j2-out" / "fused" / "release"
    assert tree_hash_uncached(fused).digest == one["fuse:release"]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(), max_size=40), st.integers(min_value=1, max_value=4))
def test_ordered_map_keeps_input_order(items: list[int], jobs: int) -> None:
    def slow_square(x: int) -> int:
        time.sleep(0.0005 * (x % 3))  # later items often finish first
        return x * x

    assert list(ordered_map(slow_square, items, jobs)) == [x * x for x in items]


def test_ordered_map_bounds_work_in_flight_and_raises() -> None:
    running, peak, lock = [0], [0], threading.Lock()

    def work(x: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.002)
        with lock:
            running[0] -= 1
        if x == 7:
            raise ValueError("tensor 7 is bad")
        return x

    gen = ordered_map(work, range(50), jobs=3)
    assert [next(gen) for _ in range(7)] == list(range(7))
    with pytest.raises(ValueError, match="tensor 7"):
        next(gen)
    assert peak[0] <= 3


def test_device_cuda_without_a_gpu_says_so_and_uses_the_cpu(path_project: Path) -> None:
    import torch

    result = CliRunner().invoke(main, ["make", str(path_project), "--device", "cuda", "-j", "2"])
    assert result.exit_code == 0, result.output
    if torch.cuda.is_available():
        assert "no CUDA device" not in result.stderr
    else:
        assert "--device cuda requested but no CUDA device is available; using the CPU" in (
            result.stderr
        )
    assert "built 6" in result.stderr + result.stdout


def test_ordered_map_budget_runs_big_items_alone() -> None:
    lock, in_flight, peak = threading.Lock(), [0], [0]
    cost = {i: (100 if i in (3, 4, 9) else 10) for i in range(12)}

    def work(i: int) -> int:
        with lock:
            in_flight[0] += cost[i]
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.003)
        with lock:
            in_flight[0] -= cost[i]
        return i

    assert list(ordered_map(work, range(12), 4, cost.__getitem__, 100)) == list(range(12))
    assert peak[0] <= 100


def test_sum_fold_equals_combine() -> None:
    import torch

    from graftbuild.fusion.sum import SumStrategy

    g = torch.Generator().manual_seed(0)
    base = torch.randn(37, 11, generator=g)
    deltas = [torch.randn(37, 11, generator=g), None, torch.randn(37, 11, generator=g)]
    weights = [0.7, 2.0, -1.3]
    s = SumStrategy()
    params = s.Params()
    want = s.combine(base, deltas, weights, params, "w")
    acc = base.clone()
    for d, w in zip(deltas, weights, strict=True):
        if d is not None:
            acc = s.fold(acc, d, w, params, "w")
    assert torch.equal(acc, want)
