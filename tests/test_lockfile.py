"""The lockfile: written by make, stable, and enforced by make --locked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO
from helpers import engine, make

from graftbuild.cli.app import main
from graftbuild.steps.pack import PackStep


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def lock_of(recipe: Path) -> dict:
    return json.loads(recipe.with_suffix(".lock").read_text())


def test_make_writes_a_stable_lock(path_project: Path) -> None:
    result = make(path_project)
    lock_file = path_project.with_suffix(".lock")
    text = lock_file.read_text()
    lock = json.loads(text)
    assert set(lock["nodes"]) == {n.id for n in result.nodes}
    for n in result.nodes:
        assert lock["nodes"][n.id]["output"] == n.output_hash
    pack = lock["nodes"]["pack:x"]
    assert pack["step"] == f"pack@{PackStep.version}" and pack["key"] == result.node("pack:x").key
    source = result.node("source:x").output_hash
    assert pack["deps"]["source"] == {"node": "source:x", "hash": source}
    assert list(pack["output_files"]) == ["skillpack.safetensors"]
    assert lock["nodes"]["source:x"] | {"output_files": None} == {
        "step": "input",
        "path": "models/x",
        "output": result.node("source:x").output_hash,
        "output_files": None,
    }
    (env,) = lock["environments"].values()
    assert env["torch"].startswith("2.") and env["transformers"] and env["graftbuild"]
    assert env["device"] == "cpu" and env["threads"] == 1  # one intra-op thread, any machine
    # the numerical paths in effect and the CPU's instruction set (weights/determinism.py)
    assert env["cpu_capability"] == "AVX2" and env["MKL_CBWR"] == "COMPATIBLE"
    assert env["mkl_branch"] == "COMPATIBLE"  # the branch MKL took, read back from MKL
    assert isinstance(env["cpu_flags"], list) and "avx2" in env["cpu_flags"]
    assert {e["env"] for e in lock["nodes"].values() if e["step"] != "input"} == set(
        lock["environments"]
    )
    # Sorted, indented JSON: a diff names the node and field that changed.
    assert text == json.dumps(lock, indent=2, sort_keys=True) + "\n"

    mtime = lock_file.stat().st_mtime_ns
    assert make(path_project).built == []
    assert lock_file.read_text() == text and lock_file.stat().st_mtime_ns == mtime


def test_lock_takes_built_objects_file_hashes_from_their_manifests(
    path_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Re-reading every built object to list its files' hashes cost a 3 GB fuse 9 GB of reads.
    import graftbuild.build.lockfile as lockfile
    from graftbuild.cache.hashing import hash_file

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the lock re-read an object")

    monkeypatch.setattr(lockfile, "tree_hash_uncached", refuse)
    result = make(path_project)
    lock = json.loads(path_project.with_suffix(".lock").read_text())
    for n in result.nodes:
        entry = lock["nodes"][n.id]
        if entry["step"] == "input":
            continue
        obj = path_project.parent / "cache" / "objects" / n.output_hash[:2] / n.output_hash
        assert entry["output_files"] == {rel: hash_file(obj / rel) for rel in entry["output_files"]}
        assert set(entry["output_files"]) == {
            p.name for p in obj.iterdir() if not p.name.startswith(".")
        }


def test_no_op_make_writes_the_lock_without_importing_torch(path_project: Path) -> None:
    make(path_project)
    path_project.with_suffix(".lock").unlink()
    code = (
        "import sys; from graftbuild.cli.app import main\n"
        "try:\n    main(['make', sys.argv[1], '-q'])\nexcept SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", code, str(path_project)], capture_output=True, text=True, env=env
    )
    assert out.stdout.split() == ["False", "False"], out.stderr
    assert set(lock_of(path_project)["nodes"]) >= {"pack:x", "fuse:release"}


def test_locked_passes_unchanged_and_names_a_changed_input(path_project: Path) -> None:
    make(path_project)
    before = path_project.with_suffix(".lock").read_text()
    assert run("make", str(path_project), "--locked")[0] == 0

    (path_project.parent / "models" / "y" / "extra.json").write_text("{}")
    code, _, err = run("make", str(path_project), "--locked")
    assert code == 2
    assert "source:y: models/y/extra.json differ from the lock" in err
    assert "Traceback" not in err

    (path_project.parent / "models" / "y" / "extra.json").unlink(missing_ok=True)
    path_project.write_text(path_project.read_text().replace("y = 0.5", "y = 0.25"))
    code, _, err = run("make", str(path_project), "--locked")
    assert code == 2
    assert "fuse:release: fusion weights changed: weights = [1.0, 0.25] (lock: [1.0, 0.5])" in err
    assert path_project.with_suffix(".lock").read_text() == before  # never rewritten

    assert run("make", str(path_project))[0] == 0  # accepting the change updates the lock
    assert lock_of(path_project)["nodes"]["fuse:release"]["config"]["weights"] == [1.0, 0.25]


def test_locked_without_a_usable_lock_is_a_user_error(path_project: Path) -> None:
    code, _, err = run("make", str(path_project), "--locked")
    assert code == 2 and "no lockfile" in err

    path_project.with_suffix(".lock").write_text("{ not json")
    code, _, err = run("make", str(path_project), "--locked")
    assert code == 2 and "not a valid lockfile" in err
    # Without --locked an unreadable lock is simply replaced.
    assert run("make", str(path_project))[0] == 0
    assert "fuse:release" in lock_of(path_project)["nodes"]


def _drop_object(recipe: Path, node: str) -> None:
    """Delete a node's object from the cache, so that the next make rebuilds it."""
    digest = lock_of(recipe)["nodes"][node]["output"]
    obj = engine(recipe).store.object_path(digest)
    shutil.rmtree(obj)


def test_locked_fails_when_a_rebuild_gives_other_bytes(path_project: Path) -> None:
    make(path_project)
    lock_file = path_project.with_suffix(".lock")
    lock = json.loads(lock_file.read_text())
    _drop_object(path_project, "pack:x")
    lock["nodes"]["pack:x"]["output"] = "0" * 32  # as if the lock came from a different build
    lock_file.write_text(json.dumps(lock))
    code, _, err = run("make", str(path_project), "--locked")
    assert code == 1
    assert "pack:x: rebuilt to" in err and "0" * 32 in err


def test_locked_refuses_to_rebuild_under_another_torch(path_project: Path) -> None:
    make(path_project)
    lock_file = path_project.with_suffix(".lock")
    lock = json.loads(lock_file.read_text())
    for env in lock["environments"].values():
        env["torch"] = "1.0.0"
        env["cpu_capability"] = "DEFAULT"
    lock_file.write_text(json.dumps(lock))
    assert run("make", str(path_project), "--locked")[0] == 0  # all cached: nothing rebuilds

    _drop_object(path_project, "pack:x")
    code, _, err = run("make", str(path_project), "--locked")
    assert code == 2
    assert "pack:x: must be rebuilt, but torch is" in err and "'1.0.0' in the lock" in err
    assert "cpu_capability is 'AVX2' here and 'DEFAULT' in the lock" in err
