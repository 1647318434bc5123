"""graftbuild verify: a from-scratch rebuild compared with the lock, node by node."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from click.testing import CliRunner
from helpers import make

from graftbuild.cli.app import main


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


def against(recipe: Path, other: str) -> tuple[int, dict, str]:
    result = CliRunner().invoke(main, ["verify", str(recipe), "--against", other, "--json"])
    out = json.loads(result.stdout) if result.stdout.strip() else {}
    return result.exit_code, out, result.stderr


def test_verify_against_another_machines_cache_and_a_remote(
    path_project: Path, tmp_path: Path
) -> None:
    """Two caches built apart agree key by key; a cache whose entry names other bytes, or
    lacks a node, does not; a remote (file://) after a push agrees too."""
    make(path_project)
    other = tmp_path / "other-cache"
    make(path_project, cache=other)
    code, report, err = against(path_project, str(other))
    assert code == 0, err
    ids = {n["id"] for n in report["nodes"]}
    assert ids == {"pack:x", "pack:y", "fuse:release"}
    assert all(n["here"] == n["there"] for n in report["nodes"])

    # the other machine's pack:x came out different: its action names pack:y's bytes
    nodes = {n["id"]: n for n in report["nodes"]}
    action = other / "actions" / nodes["pack:x"]["key"][:2] / f"{nodes['pack:x']['key']}.json"
    entry = json.loads(action.read_text())
    action.write_text(json.dumps(entry | {"output": nodes["pack:y"]["here"]}))
    code, report, _ = against(path_project, str(other))
    assert code == 1
    bad = {n["id"]: n for n in report["nodes"] if not n["ok"]}
    assert set(bad) == {"pack:x"} and "must be equal" in bad["pack:x"]["problems"][0]

    remote = tmp_path / "remote"
    text = path_project.read_text().replace(
        'cache = "cache"', f'cache = "cache"\nremote = "{remote.as_uri()}"'
    )
    path_project.write_text(text)
    assert CliRunner().invoke(main, ["push", str(path_project)]).exit_code == 0
    code, report, err = against(path_project, remote.as_uri())
    assert code == 0, err
    (remote / "actions").rename(remote / "gone")
    code, report, _ = against(path_project, remote.as_uri())
    assert code == 1 and all("has no output" in n["problems"][0] for n in report["nodes"])


def test_gpu_nodes_compare_by_value_within_the_tolerance(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from graftbuild.weights.compare import GPU_TOLERANCE, max_relative_difference

    t = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    for name, tensor in (("a", t), ("b", t * (1 + 1e-5)), ("c", t + 0.1)):
        (tmp_path / name).mkdir()
        save_file({"w": tensor}, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text("{}")
    assert max_relative_difference(tmp_path / "a", tmp_path / "a") == 0.0
    assert 0 < max_relative_difference(tmp_path / "b", tmp_path / "a") <= GPU_TOLERANCE
    assert max_relative_difference(tmp_path / "c", tmp_path / "a") > GPU_TOLERANCE
    (tmp_path / "b" / "config.json").write_text('{"x": 1}')
    assert max_relative_difference(tmp_path / "b", tmp_path / "a") == float("inf")
