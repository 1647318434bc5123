"""Incremental builds on model folders: what rebuilds after which change."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from conftest import make_source
from helpers import make, plan

ALL = ["base", "source:x", "pack:x", "source:y", "pack:y", "fuse:release"]


def test_first_build_builds_everything_and_second_build_reads_no_weights(
    path_project: Path,
) -> None:
    first = make(path_project)
    assert first.built == ALL
    assert any(p.suffix == ".safetensors" for p in first.hashed_files)

    second = make(path_project)
    assert second.built == []
    assert sorted(second.reused) == sorted(ALL)
    assert second.hashed_files == []  # the stat cache answered for every input file
    assert all(n.state == "fresh" for n in plan(path_project).values())


def test_changed_source_weights_rebuild_only_that_chain(path_project: Path) -> None:
    make(path_project)
    models = path_project.parent / "models"
    make_source(models / "x", models / "base", seed=7)

    reasons = plan(path_project)
    assert reasons["source:x"].state == "stale"
    assert "source 'x' weights changed: model.safetensors" in reasons["source:x"].reasons
    assert reasons["pack:x"].state == "stale"
    assert reasons["pack:y"].state == "fresh"

    result = make(path_project)
    assert result.built == ["source:x", "pack:x", "fuse:release"]
    assert set(result.reused) == {"base", "source:y", "pack:y"}


def test_touch_without_change_rebuilds_nothing(path_project: Path) -> None:
    make(path_project)
    weights = path_project.parent / "models" / "y" / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns + 10**9, st.st_mtime_ns + 10**9))
    result = make(path_project)
    assert result.built == []
    assert weights in result.hashed_files  # it was re-read, found identical: no rebuild


def test_only_fusion_weights_changed_rebuilds_only_the_fuse(path_project: Path) -> None:
    make(path_project)
    path_project.write_text(path_project.read_text().replace("y = 0.5", "y = 0.75"))
    assert plan(path_project)["fuse:release"].reasons == ["fusion weights changed"]
    assert make(path_project).built == ["fuse:release"]


def test_profile_change_rebuilds_packs_using_it_then_the_fuse(path_project: Path) -> None:
    make(path_project)
    path_project.write_text(path_project.read_text().replace("energy = 0.9 }", "energy = 0.8 }"))
    p = plan(path_project)
    assert p["pack:x"].reasons == ["compression profile 'default' changed"]
    assert p["pack:y"].state == "fresh"
    assert make(path_project).built == ["pack:x", "fuse:release"]


def test_spelling_out_defaults_changes_no_key(path_project: Path) -> None:
    make(path_project)
    text = (
        path_project.read_text()
        .replace(
            'attn = { method = "lowrank", energy = 0.9 }',
            'attn = { method = "lowrank", energy = 0.9, dtype = "float16" }\n'
            'norm = { method = "exact" }\nother = "exact"',
        )
        .replace('path = "models/x"', 'path = "models/x"\ncompression = "default"')
    )
    path_project.write_text(text)
    assert make(path_project).built == []


def test_deleted_output_is_restored_from_the_cache_without_rebuilding(path_project: Path) -> None:
    first = make(path_project)
    out = first.node("fuse:release").output
    assert out is not None and (out / "model.safetensors").is_file()
    shutil.rmtree(out)
    p = plan(path_project)
    assert p["fuse:release"].state == "stale"
    assert "restored from the cache" in p["fuse:release"].reasons[0]

    again = make(path_project)
    assert again.built == []
    assert again.node("fuse:release").action == "restored"
    assert (out / "model.safetensors").read_bytes() == (
        first.node("fuse:release").output / "model.safetensors"  # type: ignore[operator]
    ).read_bytes()


def test_a_rebuild_that_reproduces_the_same_pack_cuts_off_early(path_project: Path) -> None:
    make(path_project)
    # A new file in the source folder changes its hash but not its weights: the pack is rebuilt
    # to identical bytes, so the fuse is reused.
    (path_project.parent / "models" / "x" / "notes.txt").write_text("trained on tuesday\n")
    result = make(path_project)
    assert result.built == ["source:x", "pack:x"]
    assert "fuse:release" in result.reused


def test_targets_build_only_their_ancestors(path_project: Path) -> None:
    result = make(path_project, ["pack:y"])
    assert result.built == ["base", "source:y", "pack:y"]
