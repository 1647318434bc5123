"""graftbuild verify: a from-scratch rebuild compared with the lock, node by node."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from click.testing import CliRunner
from helpers import make

from graftbuild.cli import main


def verify(recipe: Path) -> tuple[int, dict, str]:
    result = CliRunner().invoke(main, ["verify", str(recipe), "--json"])
    out = json.loads(result.stdout) if result.stdout.strip() else {}
    return result.exit_code, out, result.stderr


def tamper(path: Path) -> None:
    path.chmod(path.stat().st_mode | stat.S_IWUSR)
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_verify_passes_on_a_fresh_build_and_names_a_tampered_object(path_project: Path) -> None:
    first = make(path_project)
    lock_text = path_project.with_suffix(".lock").read_text()
    out_pack = first.node("pack:x").output / "skillpack.safetensors"  # type: ignore[operator]
    out_mtime = out_pack.stat().st_mtime_ns

    code, report, err = verify(path_project)
    assert code == 0, err
    assert report["ok"] is True
    assert [n["id"] for n in report["nodes"]] == [n.id for n in first.nodes]
    for n in report["nodes"]:
        assert n["rebuilt"] == n["lock"] and n["problems"] == []
    # verify rebuilt in a scratch cache: the lock and the outputs are untouched, no scratch left.
    assert path_project.with_suffix(".lock").read_text() == lock_text
    assert out_pack.stat().st_mtime_ns == out_mtime
    assert list((path_project.parent / "cache" / "verify").iterdir()) == []

    obj = path_project.parent / "cache" / "objects"
    digest = first.node("pack:y").output_hash
    assert digest is not None
    tamper(obj / digest[:2] / digest / "skillpack.safetensors")
    code, report, _ = verify(path_project)
    assert code == 1 and report["ok"] is False
    bad = {n["id"]: n["problems"] for n in report["nodes"] if n["problems"]}
    assert list(bad) == ["pack:y"]
    assert "cached object altered" in bad["pack:y"][0]
    assert "skillpack.safetensors" in bad["pack:y"][0]


def test_verify_reports_drift_per_node(path_project: Path) -> None:
    fused = make(path_project).node("fuse:release").output_hash
    lock_file = path_project.with_suffix(".lock")
    lock = json.loads(lock_file.read_text())
    # A lock whose fused output was recorded from other bytes: the rebuild does not match it.
    lock["nodes"]["fuse:release"]["output"] = "f" * 32
    lock["nodes"]["fuse:release"]["output_files"]["model.safetensors"] = "0" * 32
    lock_file.write_text(json.dumps(lock))
    (path_project.parent / "models" / "x" / "notes.txt").write_text("an extra file")

    result = CliRunner().invoke(main, ["verify", str(path_project)])
    assert result.exit_code == 1
    assert "drift in: source:x, fuse:release" in " ".join(result.stdout.split())
    code, report, _ = verify(path_project)
    assert code == 1
    bad = {n["id"]: n["problems"] for n in report["nodes"] if n["problems"]}
    assert bad["source:x"] == ["input differs from the lock: notes.txt"]
    # Early cutoff: the extra file changes no weight, so pack:x still reproduces the lock.
    assert list(bad) == ["source:x", "fuse:release"]
    assert bad["fuse:release"] == [
        "rebuilt: model.safetensors",
        f"the cache maps its key to another object {fused}",
    ]


def test_verify_without_a_lock_exits_2(path_project: Path) -> None:
    code, _, err = verify(path_project)
    assert code == 2 and "no lockfile" in err
