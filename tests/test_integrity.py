"""Integrity: a flipped byte in a cached object or a materialised output is found (by the next
make, cheaply, and by ``graftbuild fsck``), reported with its path, and rebuilt or restored."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import make, plan

from graftbuild.cli.app import main


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Flip one byte in place (the file keeps its inode, so hardlinks see it too)."""
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    with open(path, "r+b") as f:
        f.write(data)


def replace_with_flipped_copy(path: Path) -> None:
    """What an editor does: a new file (new inode) with one byte changed."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.unlink()
    path.write_bytes(bytes(data))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_flipped_byte_in_a_hardlinked_output_is_found_and_rebuilt(path_project: Path) -> None:
    first = make(path_project)
    out = path_project.parent / "out"
    before = snapshot(out)
    pack = first.node("pack:y")
    assert pack.output is not None and pack.output_hash is not None
    obj = path_project.parent / "cache" / "objects" / pack.output_hash[:2] / pack.output_hash
    # The output is hardlinked to the object: flipping a byte in one corrupts both.
    flip_byte(pack.output / "skillpack.safetensors")
    assert (obj / "skillpack.safetensors").read_bytes() != before["packs/y/skillpack.safetensors"]

    p = plan(path_project)
    assert p["pack:y"].state == "stale"
    assert "cached object corrupt (skillpack.safetensors: content changed" in p["pack:y"].reasons[0]

    code, _, err = run("make", str(path_project))
    assert code == 0
    assert f"corrupt cached object of pack:y: {obj}: skillpack.safetensors" in err
    again = make(path_project)
    assert again.built == [] and snapshot(out) == before  # rebuilt to the very same bytes


def test_flipped_byte_in_a_copied_output_is_restored_without_rebuilding(
    path_project: Path,
) -> None:
    first = make(path_project)
    out = path_project.parent / "out"
    before = snapshot(out)
    fused = first.node("fuse:release").output
    assert fused is not None
    replace_with_flipped_copy(fused / "model.safetensors")

    p = plan(path_project)
    assert p["fuse:release"].state == "stale"
    assert "model.safetensors: changed (hash mismatch)" in p["fuse:release"].reasons[0]

    result = make(path_project)
    assert result.built == []
    assert result.node("fuse:release").action == "restored"
    assert snapshot(out) == before


def test_truncated_or_missing_object_file_is_rebuilt(path_project: Path) -> None:
    first = make(path_project)
    before = snapshot(path_project.parent / "out")
    cache = path_project.parent / "cache" / "objects"
    h = first.node("pack:x").output_hash
    assert h is not None
    weights = cache / h[:2] / h / "skillpack.safetensors"
    weights.chmod(0o644)
    with open(weights, "r+b") as f:
        f.truncate(100)
    assert make(path_project).built == ["pack:x"]
    h = first.node("fuse:release").output_hash
    assert h is not None
    (cache / h[:2] / h / "config.json").unlink()
    assert make(path_project).built == ["fuse:release"]
    assert snapshot(path_project.parent / "out") == before


def test_no_op_build_checks_objects_without_reading_them(path_project: Path) -> None:
    make(path_project)
    second = make(path_project)
    assert second.built == [] and second.hashed_files == []
    # Deleting an output changes its object's ctime (one link fewer), not its bytes: the output
    # is linked again from the object without reading it.
    out = path_project.parent / "out" / "fused" / "release"
    for p in out.iterdir():
        p.unlink()
    out.rmdir()
    third = make(path_project)
    assert third.built == [] and third.node("fuse:release").action == "restored"
    assert third.hashed_files == []
    assert make(path_project).hashed_files == []


def test_object_rewritten_in_place_is_reread_despite_same_size(path_project: Path) -> None:
    first = make(path_project)
    h = first.node("pack:x").output_hash
    assert h is not None
    pack = path_project.parent / "cache" / "objects" / h[:2] / h / "skillpack.safetensors"
    st = pack.stat()
    flip_byte(pack, offset=st.st_size - 1)  # same size, same inode, new mtime
    os.utime(pack, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = make(path_project)
    assert pack in second.hashed_files
    assert second.built == ["pack:x"]


def test_fsck_finds_reports_and_repairs(path_project: Path) -> None:
    first = make(path_project)
    out = path_project.parent / "out"
    before = snapshot(out)
    code, stdout, _ = run("fsck", str(path_project))
    assert code == 0 and "0 problems" in stdout

    h = first.node("pack:x").output_hash
    assert h is not None
    obj = path_project.parent / "cache" / "objects" / h[:2] / h
    flip_byte(obj / "skillpack.safetensors", offset=200)
    fused = out / "fused" / "release" / "model.safetensors"
    replace_with_flipped_copy(fused)

    code, stdout, _ = run("fsck", str(path_project), "--json")
    assert code == 1
    report = json.loads(stdout)
    found = {(p["kind"], p["path"]) for p in report["problems"]}
    assert ("object", str(obj)) in found
    assert ("output", str(fused.parent)) in found
    # out/packs/x shares the corrupt object's bytes: fsck says so and points at make.
    assert ("output", str(out / "packs" / "x")) in found

    code, stdout, _ = run("fsck", str(path_project), "--repair")
    assert code == 1  # the corrupt object is removed; rebuilding it is make's job
    assert f"{out / 'packs' / 'x'}: its cached object is corrupt; run graftbuild make" in stdout
    assert not obj.exists() and fused.read_bytes() == before["fused/release/model.safetensors"]

    assert make(path_project).built == ["pack:x"]
    assert snapshot(out) == before
    code, stdout, _ = run("fsck", str(path_project))
    assert code == 0 and "0 problems" in stdout


def test_fsck_without_a_recipe_checks_a_cache(tmp_path: Path, path_project: Path) -> None:
    make(path_project)
    cwd = os.getcwd()
    os.chdir(tmp_path / "models")
    try:
        code, _, err = run("fsck")
        assert code == 2 and "no --cache" in err
        code, stdout, _ = run("fsck", "--cache", str(path_project.parent / "cache"))
        assert code == 0 and "checked 3 objects and 0 outputs" in stdout
    finally:
        os.chdir(cwd)


def test_a_wrong_stat_cache_entry_is_not_taken_for_corruption(path_project: Path) -> None:
    first = make(path_project)
    stat_json = path_project.parent / "cache" / "stat.json"
    entries = json.loads(stat_json.read_text())
    h = first.node("pack:x").output_hash
    assert h is not None
    key = next(k for k in entries if h in k and k.endswith("skillpack.safetensors"))
    right = entries[key][1]
    entries[key][1] = "0" * 32  # the cache claims another hash for an unchanged file
    stat_json.write_text(json.dumps(entries))
    result = make(path_project)
    assert result.built == [] and result.node("pack:x").action == "reused"
    assert json.loads(stat_json.read_text())[key][1] == right  # settled by reading it, once


def test_replaced_output_loses_its_marker_before_its_files(
    path_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A build killed while deleting the replaced copy must not leave a marked, partial folder.
    import graftbuild.cache.store as store

    make(path_project)
    (path_project.parent / "out" / "fused" / "release" / "config.json").unlink()
    removed: list[Path] = []
    rmtree = store.shutil.rmtree

    def checked(folder: Path, **kwargs: object) -> None:
        if ".graftbuild-old-" in Path(folder).name:
            assert not (Path(folder) / store.MARKER).exists()
            removed.append(Path(folder))
        rmtree(folder, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store.shutil, "rmtree", checked)
    assert make(path_project).node("fuse:release").action == "restored"
    assert removed
