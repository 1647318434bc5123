"""The streamed fuse (steps/fuse_stream.py): a sum of reference packs computed and written piece
by piece into reused buffers. It must give the bytes of the stored exact-pack path for every
dtype, piece size and ``-j``, never hold a tensor-sized buffer, and still name what is wrong
when a result is not finite."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import exact_pair_recipe, make_base, save_model, write_recipe
from helpers import load_weights
from safetensors.torch import load

from graftbuild.build.engine import Engine, cache_dir
from graftbuild.cache.store import Store
from graftbuild.errors import BuildError
from graftbuild.recipe import load_recipe
from graftbuild.skillpack import reader as reader_module
from graftbuild.steps import fuse_stream
from graftbuild.steps import pack as pack_step
from graftbuild.steps.base import BuildSettings
from graftbuild.weights import memory


def _models(root: Path, dtype: str) -> None:
    """A tiny Llama in ``dtype`` with an integer buffer, and two fine-tunes of it: ``x`` moves
    every tensor, ``y`` leaves the embedding exactly as the base has it."""
    import torch

    state = make_base(root / "init")
    to = getattr(torch, dtype)
    state = {k: v.to(to) for k, v in state.items()}
    state["model.position_ids"] = torch.arange(7, dtype=torch.int64)  # a buffer, carried as is
    save_model(root / "base", state, config_from=root / "init")
    g = torch.Generator().manual_seed(3)
    for name, moved in (("x", lambda k: True), ("y", lambda k: "embed" not in k)):
        src = {
            k: (v + 0.02 * torch.randn(v.shape, generator=g).to(to) if moved(k) else v.clone())
            if v.is_floating_point()
            else v.clone()
            for k, v in state.items()
        }
        save_model(root / name, src, config_from=root / "base")


def _build(recipe: Path, cache: Path, jobs: int) -> bytes:
    r = load_recipe(recipe)
    Engine(r, Store(cache_dir(r, cache)), settings=BuildSettings(jobs=jobs)).make()
    out = recipe.parent / "out" / "fused" / "release" / "model.safetensors"
    data = out.read_bytes()
    shutil.rmtree(recipe.parent / "out")
    return data


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_streamed_fuse_gives_the_stored_exact_path_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    _models(tmp_path / "models", dtype)
    recipe = write_recipe(tmp_path / "graftbuild.toml", exact_pair_recipe(1.0, -0.375))

    calls: list[str] = []
    real = fuse_stream.streamed_fuse

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append("streamed")
        yield from real(*args, **kwargs)

    # the stored exact-pack path (tensor by tensor, packs hold their deltas): the reference
    monkeypatch.setattr(pack_step, "REFERENCE_LOSSLESS", False)
    stored = _build(recipe, tmp_path / "stored-cache", jobs=1)
    monkeypatch.setattr(pack_step, "REFERENCE_LOSSLESS", True)
    monkeypatch.setattr(fuse_stream, "streamed_fuse", spy)

    # pieces not vector-aligned, tasks of several pieces, one and two workers: same bytes
    for jobs, chunk in [(1, None), (2, None), (2, 1000), (1, 333)]:
        if chunk is not None:
            monkeypatch.setattr(reader_module, "DELTA_CHUNK", chunk)
        assert _build(recipe, tmp_path / f"cache-{jobs}-{chunk}", jobs) == stored
    assert len(calls) == 4  # every reference build went through the streamed fuse

    fused = load(stored)  # the buffer is the base's, as it is
    assert fused["model.position_ids"].tolist() == list(range(7))
    embed = "model.embed_tokens.weight"  # y left it alone: x's change alone reaches it
    base, x = (load_weights(tmp_path / "models" / m)[embed] for m in ("base", "x"))
    assert fused[embed].float().allclose((x.float() - base.float()) + base.float(), atol=1e-2)


def test_streamed_fuse_holds_no_tensor_sized_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every buffer it fills is one task's piece, taken from its pool: fresh tensor-sized memory
    is what it exists to avoid."""
    _models(tmp_path / "models", "float32")
    recipe = write_recipe(tmp_path / "graftbuild.toml", exact_pair_recipe(1.0, -0.375))
    monkeypatch.setattr(reader_module, "DELTA_CHUNK", 256)
    taken: list[int] = []
    real_take = fuse_stream._Buffers.take

    def take(self, dtype):  # type: ignore[no-untyped-def]
        buf = real_take(self, dtype)
        taken.append(buf.numel())
        return buf

    def no_fresh_buffers(nbytes: int):  # type: ignore[no-untyped-def]
        raise AssertionError(f"a tensor-sized buffer of {nbytes} bytes")

    _build(recipe, tmp_path / "cache", jobs=2)  # packs built
    # only the fuse is stale
    (tmp_path / "graftbuild.toml").write_text(exact_pair_recipe(0.5, -0.375))
    monkeypatch.setattr(memory, "empty", no_fresh_buffers)
    monkeypatch.setattr(fuse_stream._Buffers, "take", take)
    _build(recipe, tmp_path / "cache", jobs=2)
    assert len(taken) > 20 and max(taken) == 256 * fuse_stream.TASK_CHUNKS


@pytest.mark.parametrize(("dtype", "big"), [("float32", 3e38), ("float16", 6e4)])
def test_an_overflowing_streamed_sum_fails_naming_the_tensor(
    tmp_path: Path, dtype: str, big: float
) -> None:
    """Finite deltas whose weighted sum overflows: in float32 itself, or in the conversion to
    the model's float16. Exit 1 (a build failure), naming the tensor; nothing is written."""
    from safetensors.torch import load_file

    _models(tmp_path / "models", dtype)
    x = tmp_path / "models" / "x"
    state = load_file(str(x / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"][2, 3] = big
    save_model(x, state, config_from=tmp_path / "models" / "init")
    recipe = write_recipe(tmp_path / "graftbuild.toml", exact_pair_recipe(2.0, -0.375))
    with pytest.raises(
        BuildError, match=r"tensor 'model\.layers\.1\.mlp\.up_proj\.weight' is not finite"
    ):
        _build(recipe, tmp_path / "cache", jobs=2)
    assert not (tmp_path / "out" / "fused" / "release").exists()


def test_the_collector_pauses_while_streaming_and_resumes_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python's cyclic collector is off while pieces are made (its full passes walk torch's
    import-time objects) and on again afterwards, after a failure too."""
    import gc

    _models(tmp_path / "models", "float32")
    recipe = write_recipe(tmp_path / "graftbuild.toml", exact_pair_recipe(1.0, -0.375))
    monkeypatch.setattr(reader_module, "DELTA_CHUNK", 256)
    _build(recipe, tmp_path / "cache", jobs=1)  # packs built
    seen: list[bool] = []
    real_take = fuse_stream._Buffers.take

    def take(self, dtype):  # type: ignore[no-untyped-def]
        seen.append(gc.isenabled())
        return real_take(self, dtype)

    monkeypatch.setattr(fuse_stream._Buffers, "take", take)
    (tmp_path / "graftbuild.toml").write_text(exact_pair_recipe(0.5, -0.375))
    _build(recipe, tmp_path / "cache", jobs=1)
    assert seen and not any(seen)
    assert gc.isenabled()

    def broken(self, dtype):  # type: ignore[no-untyped-def]
        raise RuntimeError("disk gone")

    monkeypatch.setattr(fuse_stream._Buffers, "take", broken)
    (tmp_path / "graftbuild.toml").write_text(exact_pair_recipe(0.25, -0.375))
    with pytest.raises(Exception, match="disk gone"):
        _build(recipe, tmp_path / "cache", jobs=1)
    assert gc.isenabled()
