"""Elementwise work on several intra-op threads gives the bytes of one thread.

Every step runs on one intra-op thread (weights/determinism.py): SVDs and reductions change
bytes with the thread count. The ``sum`` fuse of reference packs is elementwise from end to end
(subtract, weighted add, dtype conversion), so it may lift the pin when asked
(``elementwise_threads``, ``GRAFTBUILD_ELEMENTWISE_THREADS``); these
tests check the premise on the kernels it uses, at sizes whose per-thread ranges end inside a
vector (the scalar tails), and on a whole fuse built with 1 and 3 threads.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import TINY_LLAMA, exact_pair_recipe, make_base, make_source, write_recipe

from graftbuild.build.engine import Engine, cache_dir
from graftbuild.cache.store import Store
from graftbuild.fusion import sum as sum_module
from graftbuild.recipe import load_recipe
from graftbuild.steps.base import BuildSettings
from graftbuild.weights import determinism

# An odd vocabulary and widths: tensors of several 256 Ki-entry pieces whose thread ranges
# (a third of a piece) and ends fall inside an 8-float vector.
WIDE_LLAMA = TINY_LLAMA | {
    "vocab_size": 1003,
    "hidden_size": 264,
    "intermediate_size": 712,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}

RECIPE = exact_pair_recipe(1.0, 0.3)


@pytest.mark.parametrize("n", [1_000_003, 262_144, 87_383, 5_000_011])
def test_elementwise_kernels_give_the_same_bytes_on_any_thread_count(n: int) -> None:
    import torch

    g = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=g) * 3
    source = base + torch.randn(n, generator=g) * 1e-3
    other = torch.randn(n, generator=g).to(torch.bfloat16)
    before = torch.get_num_threads()

    def ops() -> list[torch.Tensor]:
        delta = torch.sub(source, base, out=torch.empty(n))
        fused = torch.add(base, delta, alpha=0.3, out=torch.empty(n))
        folded = fused.clone().add_(delta, alpha=0.7)
        widened = torch.empty(n).copy_(other)  # bf16 -> float32
        narrowed = folded.to(torch.bfloat16)  # float32 -> bf16, rounded
        return [delta, fused, folded, widened, narrowed.view(torch.int16)]

    try:
        torch.set_num_threads(1)
        one = ops()
        for threads in (2, 3, 4):
            torch.set_num_threads(threads)
            many = ops()
            for a, b in zip(one, many, strict=True):
                assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), threads
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wide")
    make_base(root / "base", seed=3, config=WIDE_LLAMA)
    make_source(root / "x", root / "base", seed=4)
    make_source(root / "y", root / "base", seed=5)
    return root


def _fuse(tmp: Path, models: Path, text: str = RECIPE) -> bytes:
    """Build the recipe with ``-j 2`` in a fresh project; the fused weights' bytes."""
    shutil.copytree(models, tmp / "models")
    recipe = write_recipe(tmp / "graftbuild.toml", text)
    r = load_recipe(recipe)
    Engine(r, Store(cache_dir(r, None)), BuildSettings(jobs=2)).make()
    return (tmp / "out" / "fused" / "release" / "model.safetensors").read_bytes()


def test_reference_fuse_on_three_threads_gives_the_one_thread_bytes(
    tmp_path: Path, wide_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    seen: list[int] = []
    fold, fold_first = sum_module.SumStrategy.fold, sum_module.SumStrategy.fold_first

    def spy_fold(self, acc, delta, *a):  # type: ignore[no-untyped-def]
        seen.append(torch.get_num_threads())  # on the -j worker that computes
        return fold(self, acc, delta, *a)

    def spy_first(self, base, delta, *a):  # type: ignore[no-untyped-def]
        seen.append(torch.get_num_threads())
        return fold_first(self, base, delta, *a)

    monkeypatch.setattr(sum_module.SumStrategy, "fold", spy_fold)
    monkeypatch.setattr(sum_module.SumStrategy, "fold_first", spy_first)
    results = {}
    for threads in (1, 3):
        monkeypatch.setattr(determinism, "ELEMENTWISE_THREADS", threads)
        seen.clear()
        results[threads] = _fuse(tmp_path / str(threads), wide_models)
        assert seen and set(seen) == {threads}  # the fuse really ran on that many
    assert results[1] == results[3]

    # a stored lossy pack decodes with a matrix product (a reduction): the fuse keeps one thread
    monkeypatch.setattr(determinism, "ELEMENTWISE_THREADS", 3)
    seen.clear()
    lossy = RECIPE.replace(
        'path = "models/x"\ncompression = "exact"', 'path = "models/x"\ncompression = "low"'
    )
    lossy += '\n[compression.low]\nattn = { method = "lowrank", rank = 4 }\n'
    _fuse(tmp_path / "lossy", wide_models, lossy)
    assert seen and set(seen) == {1}


def test_thread_count_is_one_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(determinism, "ELEMENTWISE_THREADS", None)
    monkeypatch.delenv("GRAFTBUILD_ELEMENTWISE_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # not ours: torch's default, pinned to one
    assert determinism.elementwise_thread_count() == 1
    monkeypatch.setenv("GRAFTBUILD_ELEMENTWISE_THREADS", "4")
    assert determinism.elementwise_thread_count() == 4
    monkeypatch.setenv("GRAFTBUILD_ELEMENTWISE_THREADS", "not a number")
    assert determinism.elementwise_thread_count() == 1
    monkeypatch.setattr(determinism, "ELEMENTWISE_THREADS", 2)
    assert determinism.elementwise_thread_count() == 2


def test_elementwise_threads_restores_the_pin() -> None:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with determinism.elementwise_threads() as n:
            assert torch.get_num_threads() == n
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_bf16_reference_fuse_gives_the_stored_exact_pack_bytes(
    tmp_path: Path, wide_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bf16 base is widened to float32 piece by piece before the folds (the path the float32
    base skips); reference and stored packs give the same fused bytes, on 3 threads."""
    import torch
    from safetensors.torch import load_file, save_file

    from graftbuild.steps import pack as pack_step

    bf16 = tmp_path / "bf16"
    shutil.copytree(wide_models, bf16)
    for m in ("base", "x", "y"):
        f = bf16 / m / "model.safetensors"
        state = {k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}
        save_file(state, str(f), metadata={"format": "pt"})
    monkeypatch.setattr(determinism, "ELEMENTWISE_THREADS", 3)
    by_reference = _fuse(tmp_path / "ref", bf16)
    monkeypatch.setattr(pack_step, "REFERENCE_LOSSLESS", False)
    assert _fuse(tmp_path / "stored", bf16) == by_reference
