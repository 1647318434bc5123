"""``graftbuild inspect``: a real pack's codecs, ranks, bits, bytes, shares and errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import PATH_RECIPE, write_recipe
from helpers import make

from graftbuild.cli.app import main
from graftbuild.skillpack import PackReader
from graftbuild.weights.tensors import ModelWeights


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, model_folders: Path) -> Path:
    """PATH_RECIPE with its packs built (x: default profile with attn lowrank, y: exact)."""
    root = tmp_path_factory.mktemp("inspect")
    shutil.copytree(model_folders, root / "models")
    recipe = write_recipe(root / "graftbuild.toml", PATH_RECIPE)
    make(recipe, ["pack:x", "pack:y"])
    return recipe


def test_inspect_a_recipe_pack_as_json(project: Path) -> None:
    code, out, err = run("inspect", "pack:x", "--recipe", str(project), "--json")
    assert code == 0, err
    report = json.loads(out)
    pack = project.parent / "out" / "packs" / "x" / "skillpack.safetensors"
    with PackReader(pack) as reader:
        assert report["payload_bytes"] == reader.payload_nbytes()
        names = reader.names()
        entries = reader.entries
    rows = {t["name"]: t for t in report["tensors"]}
    assert sorted(rows) == names
    assert math.isclose(sum(t["share"] for t in rows.values()), 1.0)
    by_role = {r["role"]: r for r in report["by_role"]}
    assert set(by_role) == {e["role"] for e in entries.values()}
    assert sum(r["bytes"] for r in by_role.values()) == report["payload_bytes"]
    assert [r["layer"] for r in report["by_layer"]] == ["0", "1", "-"]

    mlp = rows["model.layers.0.mlp.up_proj.weight"]
    assert mlp["codec"] == "mixed" and mlp["quantizer"] == "rtn"
    assert mlp["bands"] == entries["model.layers.0.mlp.up_proj.weight"]["meta"]["bands"]
    assert mlp["rank"] == sum(b["rank"] for b in mlp["bands"])
    attn = rows["model.layers.1.self_attn.q_proj.weight"]
    assert attn["codec"] == "lowrank" and attn["rank"] >= 1 and attn["layer"] == "1"
    embed = rows["model.embed_tokens.weight"]
    assert embed["codec"] == "prune" and embed["keep"] == pytest.approx(0.1, abs=1e-3)

    # Relative errors, computed independently from the models the recipe names.
    models = project.parent / "models"
    with ModelWeights(models / "base") as b, ModelWeights(models / "x") as s, PackReader(pack) as r:
        for name in ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"):
            delta = s.get(name).float() - b.get(name).float()
            expected = float((r.decode(name) - delta).norm() / delta.norm())
            assert rows[name]["rel_error"] == pytest.approx(expected, rel=1e-4)
    assert rows["model.norm.weight"]["rel_error"] == 0.0
    assert 0 < report["rel_error"] < 1


def test_inspect_a_file_with_and_without_sources(project: Path) -> None:
    folder = project.parent / "out" / "packs" / "y"
    models = project.parent / "models"
    code, out, _ = run("inspect", str(folder), "--json")
    assert code == 0
    report = json.loads(out)
    assert all(t["rel_error"] is None for t in report["tensors"])
    assert {t["codec"] for t in report["tensors"]} == {"exact"}
    code, out, _ = run(
        "inspect", str(folder), "--base", str(models / "base"), "--source", str(models / "y"),
        "--json",
    )  # fmt: skip
    assert code == 0
    assert json.loads(out)["rel_error"] == 0.0  # exact pack of y against y

    code, out, _ = run("inspect", str(folder / "skillpack.safetensors"))
    assert code == 0
    assert "per role" in out and "per layer" in out and "exact" in out


def test_inspect_text_shows_bands_and_errors(project: Path) -> None:
    code, out, _ = run("inspect", "pack:x", "--recipe", str(project))
    assert code == 0
    assert "rel err" in out and "of the fp16 delta" in out
    assert "mixed" in out and "lowrank" in out and "prune" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nowhere.safetensors"], "no such SkillPack"),
        (["pack:nope"], "no pack 'nope'"),
        (["pack:x", "--base", "."], "--base and --source go together"),
    ],
)
def test_inspect_errors(project: Path, args: list[str], message: str) -> None:
    code, _, err = run("inspect", *args, "--recipe", str(project))
    assert code == 2 and message in err and "Traceback" not in err


def test_inspect_unbuilt_pack_says_how_to_build(tmp_path: Path, model_folders: Path) -> None:
    shutil.copytree(model_folders, tmp_path / "models")
    recipe = write_recipe(tmp_path / "graftbuild.toml", PATH_RECIPE)
    code, _, err = run("inspect", "pack:x", "--recipe", str(recipe))
    assert code == 2 and "graftbuild make pack:x" in err


def test_inspect_reports_gptq_and_bands(tmp_path: Path) -> None:
    """A pack with mixed bands of several precisions, as written by the codec."""
    from graftbuild.compress.gptq import Calibration
    from graftbuild.skillpack import PackWriter, encode_tensor

    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(40, 30, generator=gen)
    x = torch.randn(100, 30, generator=gen)
    spec = {"method": "mixed", "bands": [{"rank": 2, "bits": 8}, {"rank": 6, "bits": 2}]}
    path = tmp_path / "p.safetensors"
    with PackWriter(path, {}) as w:
        codec, params, enc = encode_tensor(delta, spec, Calibration(x.T @ x / 100))
        w.add("model.layers.3.mlp.down_proj.weight", "mlp", codec, params, (40, 30), "float32", enc)
    code, out, _ = run("inspect", str(path), "--json")
    row = json.loads(out)["tensors"][0]
    assert code == 0 and row["quantizer"] == "gptq" and row["layer"] == "3"
    assert row["bands"] == [{"rank": 2, "bits": 8}, {"rank": 6, "bits": 2}] and row["rank"] == 8
