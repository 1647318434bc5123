"""Reference packs: a lossless pack names its source instead of storing a model-sized delta.

The fuse computes each delta from base and source; the result must be the bytes of the stored
exact-pack path, and every change to the source's weights must still reach the fuse.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import exact_pair_recipe, make_source, write_recipe
from helpers import engine, load_weights, make

from graftbuild.errors import UserError
from graftbuild.skillpack import PackReader, write_stored
from graftbuild.skillpack import reader as reader_module
from graftbuild.skillpack.format import PACK_FILE, REFERENCE_FORMAT_VERSION
from graftbuild.steps import pack as pack_step

RECIPE = exact_pair_recipe(1.0, 0.5)


@pytest.fixture
def project(tmp_path: Path, model_folders: Path) -> Path:
    """The shared test models (conftest), with both sources packed losslessly."""
    shutil.copytree(model_folders, tmp_path / "models")
    return write_recipe(tmp_path / "graftbuild.toml", RECIPE)


def _object(recipe: Path, node: str, cache: Path | None = None) -> Path:
    e = engine(recipe, cache)
    found = {n.id: n for n in e.plan()}[node]
    assert found.output_hash is not None
    return e.store.object_path(found.output_hash)


def _fused_bytes(recipe: Path) -> bytes:
    return (recipe.parent / "out" / "fused" / "release" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("chunk", [None, 1000])
def test_reference_pipeline_gives_the_stored_exact_path_bytes(
    project: Path, monkeypatch: pytest.MonkeyPatch, chunk: int | None
) -> None:
    if chunk is not None:  # the second source folded in pieces, not vector-aligned ones
        monkeypatch.setattr(reader_module, "DELTA_CHUNK", chunk)
    make(project)
    by_reference = _fused_bytes(project)
    pack_x = _object(project, "pack:x") / PACK_FILE
    model_bytes = (project.parent / "models" / "x" / "model.safetensors").stat().st_size
    assert pack_x.stat().st_size < model_bytes / 20  # a pointer, not a model-sized copy
    with PackReader(pack_x) as reader:
        assert reader.is_reference and reader.format_version == REFERENCE_FORMAT_VERSION
        assert set(reader.reference["files"]) == {"model.safetensors"}  # type: ignore[index]

    # today's path: stored exact packs, in a cache of their own
    monkeypatch.setattr(pack_step, "REFERENCE_LOSSLESS", False)
    shutil.rmtree(project.parent / "out")
    stored_cache = project.parent / "stored-cache"
    make(project, cache=stored_cache)
    assert _fused_bytes(project) == by_reference
    stored_x = _object(project, "pack:x", stored_cache) / PACK_FILE
    with PackReader(stored_x) as reader:
        assert not reader.is_reference

    # a reference pack rewritten as a stored one is that stored pack, byte for byte
    models = project.parent / "models"
    with PackReader(pack_x, models / "base", models / "x") as reader:
        write_stored(reader, project.parent / "rewritten.safetensors")
        some = reader.names()[0]
        with PackReader(stored_x, models / "base") as stored:
            assert reader.decode(some).equal(stored.decode(some))
            # the source itself from a reference pack; base + delta (to rounding) from a stored one
            assert reader.source_tensor(some).equal(load_weights(models / "x")[some].float())
            assert reader.source_tensor(some).allclose(stored.source_tensor(some), atol=1e-6)
    assert (project.parent / "rewritten.safetensors").read_bytes() == stored_x.read_bytes()


def test_a_reference_pack_without_its_source_says_what_it_needs(project: Path) -> None:
    make(project, ["pack:x"])
    pack_x = _object(project, "pack:x") / PACK_FILE
    with PackReader(pack_x) as reader:
        name = reader.names()[0]
        with pytest.raises(UserError, match=r"reference pack.*needs its base model folder"):
            reader.decode(name)
        reader.attach(base=project.parent / "models" / "base")
        with pytest.raises(UserError, match=r"reference pack.*needs its source model folder"):
            reader.decode(name)


def test_changed_source_weights_rebuild_pack_and_fuse(project: Path) -> None:
    make(project)
    before = _fused_bytes(project)
    models = project.parent / "models"
    make_source(models / "x", models / "base", seed=7)
    result = make(project)
    assert result.built == ["source:x", "pack:x", "fuse:release"]
    after = _fused_bytes(project)
    assert after != before
    # and it is the fuse of the new weights: the same as a fresh build in an empty cache
    shutil.rmtree(project.parent / "out")
    make(project, cache=project.parent / "fresh-cache")
    assert _fused_bytes(project) == after


def test_source_changed_behind_a_restored_mtime_still_rebuilds(project: Path) -> None:
    make(project)
    before = _fused_bytes(project)
    weights = project.parent / "models" / "x" / "model.safetensors"
    st = os.stat(weights)
    with open(weights, "r+b") as f:  # same size, one byte of the last tensor's data flipped
        f.seek(st.st_size - 2)
        byte = f.read(1)
        f.seek(st.st_size - 2)
        f.write(bytes([byte[0] ^ 0x01]))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(weights).st_mtime_ns == st.st_mtime_ns and os.stat(weights).st_size == st.st_size
    result = make(project)
    assert result.built == ["source:x", "pack:x", "fuse:release"]
    assert _fused_bytes(project) != before


def test_a_new_file_beside_the_source_weights_cuts_off_at_the_pack(project: Path) -> None:
    make(project)
    (project.parent / "models" / "x" / "notes.txt").write_text("trained on tuesday\n")
    result = make(project)
    assert result.built == ["source:x", "pack:x"]  # same reference bytes: the fuse is reused
    assert "fuse:release" in result.reused


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nan_or_inf_in_a_reference_source_names_the_tensor(project: Path, bad: str) -> None:
    from conftest import save_model
    from safetensors.torch import load_file

    models = project.parent / "models"
    state = load_file(str(models / "y" / "model.safetensors"))
    state["model.layers.1.self_attn.v_proj.weight"][3, 4] = float(bad)
    save_model(models / "y", state, config_from=models / "base")
    with pytest.raises(
        UserError,
        match=r"models/y: tensor 'model\.layers\.1\.self_attn\.v_proj"
        r"\.weight': NaN or Inf in the delta",
    ):
        make(project)
