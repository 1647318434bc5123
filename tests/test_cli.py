"""The command line: JSON output, exit codes, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from graftbuild.cli.app import main


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_make_and_plan_json(path_project: Path) -> None:
    code, out, _ = run("make", str(path_project), "--json")
    assert code == 0
    last = json.loads(out.strip().splitlines()[-1])
    assert last["reused"] == [] and "fuse:release" in last["built"]

    code, out, _ = run("make", str(path_project), "--json")
    assert json.loads(out.strip().splitlines()[-1])["built"] == []

    code, out, _ = run("plan", str(path_project), "--json")
    assert code == 0
    nodes = json.loads(out)["nodes"]
    assert [n["id"] for n in nodes][-1] == "fuse:release"
    assert all(n["state"] == "fresh" and n["reasons"] == [] for n in nodes)


def test_plan_text_explains_staleness(path_project: Path) -> None:
    code, out, _ = run("plan", str(path_project))
    assert code == 0
    assert "never built" in out


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: t.replace('name = "t"', 'name = "t'), "invalid TOML"),
        (lambda t: t.replace('name = "t"', 'name = "t"\ncahce = "x"'), "did you mean 'cache'"),
        (lambda t: t.replace("energy = 0.9", "energy = 1.5"), "compression.default.attn"),
        (lambda t: t.replace('packs = ["x", "y"]', "packs = []"), "fuse.0.packs"),
        (lambda t: t.replace('packs = ["x", "y"]', 'packs = ["x", "y", "z"]'), "no source 'z'"),
        (lambda t: t.replace('path = "models/y"', 'path = "models/nope"'), "not found"),
    ],
)
def test_user_errors_exit_2_with_one_line(path_project: Path, edit, expected: str) -> None:
    path_project.write_text(edit(path_project.read_text()))
    code, out, err = run("make", str(path_project))
    assert code == 2, (out, err)
    assert expected in err
    assert "Traceback" not in err


def test_toml_error_names_line_and_column(path_project: Path) -> None:
    path_project.write_text(path_project.read_text().replace("[base]", "[base"))
    code, _, err = run("plan", str(path_project))
    assert code == 2 and "line" in err and "column" in err


def test_pickle_weights_are_refused_never_loaded(path_project: Path) -> None:
    folder = path_project.parent / "models" / "x"
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    code, _, err = run("make", str(path_project))
    assert code == 2
    assert "pickle" in err and "pytorch_model.bin" in err


def test_debug_shows_traceback(path_project: Path) -> None:
    path_project.write_text(path_project.read_text().replace('path = "models/y"', 'path = "nope"'))
    result = CliRunner().invoke(main, ["--debug", "make", str(path_project)])
    assert result.exception is not None and result.exit_code != 0
