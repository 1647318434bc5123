"""status, graph, gc and clean."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import make

from graftbuild.cli.app import main


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def object_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def objects(cache: Path) -> set[str]:
    return {p.name for p in (cache / "objects").glob("*/*")}


def test_status_shows_built_nodes_sizes_and_cache_use(path_project: Path) -> None:
    code, out, _ = run("status", str(path_project), "--json")
    assert code == 0
    before = json.loads(out)
    assert {n["state"] for n in before["nodes"]} == {"stale"}
    assert before["cache"]["objects"] == 0

    result = make(path_project)
    code, out, _ = run("status", str(path_project), "--json")
    doc = json.loads(out)
    cache = path_project.parent / "cache"
    for n in doc["nodes"]:
        assert n["state"] == "built" and n["matches_lock"] is True
        if not n["id"].startswith(("base", "source:")):
            digest = result.node(n["id"]).output_hash
            assert n["bytes"] == object_bytes(cache / "objects" / digest[:2] / digest)  # type: ignore[index]
    assert doc["cache"]["objects"] == 3  # two packs and the fused model
    assert doc["cache"]["object_bytes"] == sum(
        object_bytes(p) for p in (cache / "objects").glob("*/*")
    )
    assert doc["cache"]["registered_locks"] == 1

    path_project.write_text(path_project.read_text().replace("y = 0.5", "y = 0.25"))
    code, out, _ = run("status", str(path_project))
    assert code == 0
    line = next(x for x in out.splitlines() if x.startswith("fuse:release"))
    assert "stale" in line


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("dot", ["digraph graftbuild {", '"pack:x" -> "fuse:release" [label="pack.0"];']),
        ("mermaid", ["flowchart LR", 'n2["pack:x<br/>pack"]', "n2 -->|pack.0| n5"]),
        ("text", ["fuse:release  [fuse]  <- base (base), pack:x (pack.0), pack:y (pack.1)"]),
    ],
)
def test_graph_formats(path_project: Path, fmt: str, expected: list[str]) -> None:
    code, out, err = run("graph", str(path_project), "--format", fmt)
    assert code == 0, err
    for line in expected:
        assert line in out
    assert not (path_project.parent / "cache" / "objects").exists()  # planning only


def test_graph_of_one_target(path_project: Path) -> None:
    code, out, _ = run("graph", str(path_project), "pack:x")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == ["base", "source:x", "pack:x"]


def test_gc_keeps_every_referenced_object_and_frees_the_rest(path_project: Path) -> None:
    cache = path_project.parent / "cache"
    first = make(path_project)
    old_fuse = first.node("fuse:release").output_hash
    # A second recipe sharing the cache, with its own lock.
    other = path_project.with_name("other.toml")
    other.write_text(
        path_project.read_text()
        .replace("y = 0.5", "y = 0.75")
        .replace('name = "release"', 'name = "other"')
    )
    other_fuse = make(other).node("fuse:other").output_hash
    path_project.write_text(path_project.read_text().replace("y = 0.5", "y = 0.25"))
    new_fuse = make(path_project).node("fuse:release").output_hash
    assert len({old_fuse, other_fuse, new_fuse}) == 3
    assert old_fuse in objects(cache)
    garbage = cache / "objects" / old_fuse[:2] / old_fuse  # type: ignore[index]
    size = object_bytes(garbage)
    (cache / "tmp" / "leftover").mkdir()
    (cache / "tmp" / "leftover" / "part").write_bytes(b"x" * 1000)

    code, out, _ = run("gc", str(path_project), "--dry-run", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["removed"] == [old_fuse] and report["bytes"] == size
    # The action entry that maps the old key to it goes too.
    assert report["tmp_bytes"] == 1000 and report["actions_removed"] == 1
    assert len(report["locks"]) == 2
    assert old_fuse in objects(cache)  # a dry run removes nothing

    code, out, _ = run("gc", str(path_project))
    assert code == 0
    assert "removed 1 object(s)" in out
    kept = objects(cache)
    referenced = set()
    for lock in (path_project.with_suffix(".lock"), other.with_suffix(".lock")):
        referenced |= {
            e["output"]
            for e in json.loads(lock.read_text())["nodes"].values()
            if e["step"] != "input"
        }
    assert kept == referenced and old_fuse not in kept
    assert list((cache / "tmp").iterdir()) == []
    # Nothing that a lock references was lost: both recipes are up to date.
    assert make(path_project).built == [] and make(other).built == []

    # A lockfile that is gone no longer protects its objects.
    other.with_suffix(".lock").unlink()
    code, out, _ = run("gc", str(path_project), "--json")
    report = json.loads(out)
    assert report["removed"] == [other_fuse] and report["dropped_locks"]
    assert report["actions_removed"] == 1  # the action pointing at the removed object
    assert make(path_project).built == []


def test_gc_frees_disk_only_for_unlinked_files(path_project: Path) -> None:
    make(path_project)
    path_project.write_text(path_project.read_text().replace("y = 0.5", "y = 0.25"))
    make(path_project)
    code, out, _ = run("gc", str(path_project), "--dry-run", "--json")
    assert code == 0
    report = json.loads(out)
    # The old fused model's files were hard-linked into out/ and replaced there: all freed.
    assert report["bytes"] > 0 and report["bytes_on_disk"] == report["bytes"]


def test_gc_needs_a_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run("gc")
    assert code == 2 and "which cache" in err


def test_clean_removes_only_our_outputs_and_make_restores_them(path_project: Path) -> None:
    make(path_project)
    out = path_project.parent / "out"
    user = out / "fused" / "release"
    assert (user / ".graftbuild.json").is_file()
    code, text, _ = run("clean", str(path_project), "--dry-run")
    assert code == 0 and "would remove" in text and (out / "packs" / "x").is_dir()

    code, text, _ = run("clean", str(path_project), "--json")
    assert code == 0
    assert sorted(json.loads(text)["removed"]) == sorted(
        str(out / p) for p in ("packs/x", "packs/y", "fused/release")
    )
    assert not out.exists() or list(out.iterdir()) == []
    result = make(path_project)
    assert result.built == [] and (out / "fused" / "release" / "model.safetensors").is_file()

    # A folder graftbuild did not write is never removed.
    shutil.rmtree(out / "packs" / "x")
    (out / "packs" / "x").mkdir()
    (out / "packs" / "x" / "mine.txt").write_text("user data")
    code, text, _ = run("clean", str(path_project))
    assert code == 0 and "not written by graftbuild" in text
    assert (out / "packs" / "x" / "mine.txt").is_file()
