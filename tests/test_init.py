"""``graftbuild init``: a commented starter recipe that builds as written."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

from click.testing import CliRunner
from helpers import load_weights

from graftbuild.cli.app import main


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_init_writes_a_recipe_that_builds(tmp_path: Path, model_folders: Path) -> None:
    import torch

    shutil.copytree(model_folders, tmp_path / "models")
    recipe = tmp_path / "project" / "graftbuild.toml"
    m = tmp_path / "models"
    code, _, err = run(
        "init",
        "--base",
        str(m / "base"),
        "--source",
        f"x={m / 'x'}",
        "--source",
        f"y={m / 'y'}",
        "-o",
        str(recipe),
    )
    assert code == 0, err
    text = recipe.read_text()
    doc = tomllib.loads(text)
    assert doc["base"] == {"path": "../models/base"}  # relative: the project moves as a whole
    assert doc["sources"] == {"x": {"path": "../models/x"}, "y": {"path": "../models/y"}}
    assert doc["fuse"][0]["weights"] == {"x": 0.5, "y": 0.5}
    assert text.index("budget") < text.index("embed =")  # size guidance comes first
    assert "LoRA" in text

    code, _, err = run("make", str(recipe), "--json")
    assert code == 0, err
    fused = load_weights(tmp_path / "project" / "out" / "fused" / "release")
    base, x = load_weights(m / "base"), load_weights(m / "x")
    name = "model.layers.0.input_layernorm.weight"  # norms are packed exactly by default
    y = load_weights(m / "y")
    expect = base[name] + 0.5 * (x[name] - base[name]) + 0.5 * (y[name] - base[name])
    torch.testing.assert_close(fused[name], expect)

    assert run("init", "-o", str(recipe))[0] == 2  # never overwrites a recipe silently


def test_init_without_models_writes_placeholders_and_refuses_bad_sources(tmp_path: Path) -> None:
    recipe = tmp_path / "graftbuild.toml"
    code, out, _ = run("init", "-o", str(recipe))
    assert code == 0 and "TODO" in out
    doc = tomllib.loads(recipe.read_text())
    assert doc["base"]["path"] == "path/to/base" and doc["sources"]["skill"]
    code, _, err = run("plan", str(recipe))
    assert code == 2 and "path/to/base" in err
    code, _, err = run("init", "--source", "nopath", "-o", str(tmp_path / "b.toml"))
    assert code == 2 and "NAME=PATH" in err
    code, _, err = run("init", "--source", f"a={tmp_path}", "-o", str(tmp_path / "c.toml"))
    assert code == 2 and "not a model folder" in err
