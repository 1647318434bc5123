"""The no-op fast path: a record of the last build answers by stat alone, and nothing less."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_source

from graftbuild.cli.entry import main

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
from graftbuild.cli.entry import fast_path
hit = fast_path(sys.argv[1:])
heavy = sorted(m for m in ("torch", "transformers", "networkx", "pydantic", "click", "rich")
               if m in sys.modules)
print(json.dumps({"hit": hit, "heavy": heavy}))
"""


def probe(*argv: str) -> dict:
    """Run the fast path in a fresh interpreter; report whether it answered and what it loaded."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
        raise SystemExit(0)  # the fast path returns instead of exiting
    assert e.value.code in (0, None)
    return capsys.readouterr().out


def built(out: str) -> list[str]:
    return json.loads(out.strip().splitlines()[-1])["built"]


@pytest.fixture
def built_project(path_project: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    assert "fuse:release" in built(cli(capsys, "make", str(path_project), "--json"))
    return path_project


def test_noop_make_and_plan_import_nothing_heavy(built_project: Path) -> None:
    for argv in (["make", str(built_project)], ["plan", str(built_project), "--json"]):
        assert probe(*argv) == {"hit": True, "heavy": []}


def test_noop_plan_on_the_slow_path_imports_no_torch(built_project: Path) -> None:
    for record in (built_project.parent / "cache" / "noop").iterdir():
        record.unlink()
    code = (
        "import sys; from graftbuild.cli.entry import main\n"
        "try:\n main(sys.argv[1:])\nexcept SystemExit:\n pass\n"
        "print('TORCH', 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", code, "plan", str(built_project)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert "fresh" in out and "stale" not in out
    assert out.strip().splitlines()[-1] == "TORCH False False"


def test_fast_answers_match_the_planner(
    built_project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fast = cli(capsys, "plan", str(built_project), "--json")
    for record in (built_project.parent / "cache" / "noop").iterdir():
        record.unlink()
    slow = cli(capsys, "plan", str(built_project), "--json")
    assert json.loads(fast) == json.loads(slow)
    out = cli(capsys, "make", str(built_project), "--json")  # slow no-op: writes a new record
    assert built(out) == []
    fast_make = cli(capsys, "make", str(built_project), "--json")
    assert untimed(json.loads(fast_make.strip().splitlines()[-1])) == untimed(
        json.loads(out.splitlines()[-1])
    )


def untimed(summary: dict) -> dict:
    """``make --json``'s object without the wall times (measured, so never equal twice)."""
    for n in summary["nodes"]:
        n["seconds"] = None
    summary["totals"]["seconds"] = 0.0
    return summary


def edit_weights(p: Path) -> None:
    models = p.parent / "models"
    make_source(models / "x", models / "base", seed=7)


def edit_recipe(p: Path) -> None:
    p.write_text(p.read_text().replace("y = 0.5", "y = 0.25"))


def add_file(p: Path) -> None:
    (p.parent / "models" / "x" / "vocab_notes.txt").write_text("a file the folder hash covers")


def delete_output(p: Path) -> None:
    (p.parent / "out" / "fused" / "release" / "model.safetensors").unlink()


def touch_same_bytes(p: Path) -> None:
    f = p.parent / "models" / "y" / "model.safetensors"
    f.write_bytes(f.read_bytes())


@pytest.mark.parametrize(
    ("change", "expect_built"),
    [
        (edit_weights, True),
        (edit_recipe, True),
        (add_file, True),  # a new file in a model folder: its hash changes
        (delete_output, False),  # restored from the cache, not rebuilt
        (touch_same_bytes, False),  # rewritten identically: rehashed, nothing rebuilt
    ],
)
def test_any_change_leaves_the_fast_path(
    built_project: Path, capsys: pytest.CaptureFixture[str], change, expect_built: bool
) -> None:
    change(built_project)
    assert probe("make", str(built_project))["hit"] is False
    out = cli(capsys, "make", str(built_project), "--json")
    assert bool(built(out)) == expect_built
    assert probe("make", str(built_project))["hit"] is True  # recorded again


def test_targets_and_cache_are_part_of_the_record(
    built_project: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert probe("make", str(built_project), "pack:x")["hit"] is False
    assert probe("make", str(built_project), "--cache", str(tmp_path / "other"))["hit"] is False
    cli(capsys, "make", str(built_project), "pack:x")
    assert probe("make", str(built_project), "pack:x")["hit"] is True
