"""Releases: model card, manifest, eval gates, and byte-identical clean builds."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TINY_LLAMA, TOKENIZER
from helpers import make

from graftbuild.cli.app import main
from graftbuild.release.card import read_front_matter

RECIPE = """
[project]
name = "rel"
version = "1.2.0"
cache = "cache"

[base]
config = "base_config.json"
tokenizer = "tokenizer"
seed = 3

[sources.a]
finetune = { data = "a.txt", steps = 6, lr = 3e-3, batch_size = 4, seq_len = 16, seed = 1 }

[sources.b]
finetune = { data = "b.txt", steps = 6, lr = 3e-3, batch_size = 4, seq_len = 16, seed = 2 }

[[fuse]]
name = "release"
packs = ["a", "b"]

[[eval]]
name = "losses"
models = ["base", "source:a", "fuse:release"]
data = { a = "a_heldout.txt", general = "general.txt" }
seq_len = 16
gates = [
  { model = "fuse:release", data = "a", min_improvement = 0.0 },
  { model = "fuse:release", data = "general", max_increase = 1.0 },
]

[[release]]
name = "release"
license = "apache-2.0"
tags = ["demo"]
"""


def write_project(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "base_config.json").write_text(json.dumps(TINY_LLAMA))
    shutil.copytree(TOKENIZER, root / "tokenizer")
    (root / "a.txt").write_text("".join(f"{i} + {i} = {2 * i}\n" for i in range(60)))
    (root / "b.txt").write_text("".join(f"def f{i}(x): return x * {i}\n" for i in range(60)))
    (root / "a_heldout.txt").write_text("".join(f"{i} + {i} = {2 * i}\n" for i in range(60, 80)))
    words = ["cat", "dog", "bird", "fish"]
    (root / "general.txt").write_text(
        "".join(f"the {words[i % 4]} sat on mat {i}\n" for i in range(24))
    )
    recipe = root / "graftbuild.toml"
    recipe.write_text(RECIPE)
    return recipe


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """The release project built once (copy it before changing anything)."""
    recipe = write_project(tmp_path_factory.mktemp("release") / "proj")
    return recipe, make(recipe)


@pytest.fixture
def project(built: tuple[Path, object], tmp_path: Path) -> Path:
    """A private copy of the built project, cache and outputs included."""
    src, _ = built
    shutil.copytree(src.parent, tmp_path / "proj", symlinks=True)
    return tmp_path / "proj" / "graftbuild.toml"


def cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_two_clean_builds_give_identical_bytes_for_every_node(
    built: tuple[Path, object], tmp_path: Path
) -> None:
    recipe, one = built
    other = write_project(tmp_path / "elsewhere")
    two = make(other)
    assert two.built == one.built  # type: ignore[attr-defined]
    assert "release:release" in two.built and "source:a" in two.built
    hashes = {n.id: n.output_hash for n in one.nodes}  # type: ignore[attr-defined]
    assert {n.id: n.output_hash for n in two.nodes} == hashes
    # The locks agree to the byte (paths are relative, no timestamps), and so do the cards.
    assert other.with_suffix(".lock").read_text() == recipe.with_suffix(".lock").read_text()
    for name in ("README.md", "graftbuild-manifest.json", "model.safetensors"):
        a = recipe.parent / "out" / "release" / "release" / name
        b = other.parent / "out" / "release" / "release" / name
        assert a.read_bytes() == b.read_bytes()


def test_release_folder_has_card_and_manifest(built: tuple[Path, object]) -> None:
    recipe, result = built
    folder = recipe.parent / "out" / "release" / "release"
    card = (folder / "README.md").read_text()
    front = read_front_matter(card)
    assert front == {
        "library_name": "transformers",
        "license": "apache-2.0",
        "tags": ["graftbuild", "graftllm", "merge", "demo"],
    }
    assert "# rel — release" in card and "version `1.2.0`" in card
    fused = result.node("fuse:release").output_hash  # type: ignore[attr-defined]
    assert f"content hash `{fused}`" in card
    for pack in ("a", "b"):
        digest = result.node(f"pack:{pack}").output_hash  # type: ignore[attr-defined]
        row = next(line for line in card.splitlines() if line.startswith(f"| `{pack}` |"))
        assert f"`{digest}`" in row and "KiB" in row
        assert "attn: lowrank(dtype=float16, energy=0.9)" in row and "mlp: mixed(" in row
    metrics = json.loads((recipe.parent / "out" / "evals" / "losses" / "metrics.json").read_text())
    loss = metrics["fuse:release"]["general"]["loss"]
    row = next(line for line in card.splitlines() if line.startswith("| `fuse:release` |"))
    assert f"{loss:.4f}" in row
    table = card[card.index("### Evaluation `losses`") :].split("\n\n")[1].splitlines()
    assert table[0] == "| model | a | general |"
    rows = [r.split(" | ")[0] for r in table[2:]]
    assert rows == ["| `base`", "| `source:a`", "| `fuse:release`"]  # the recipe's order
    assert card.count("| pass |") == 2

    manifest = json.loads((folder / "graftbuild-manifest.json").read_text())
    files = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())
    assert sorted(manifest["files"]) == [f for f in files if f != "graftbuild-manifest.json"]
    assert "README.md" in manifest["files"] and "model.safetensors" in manifest["files"]
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry["size"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    fused_weights = recipe.parent / "out" / "fused" / "release" / "model.safetensors"
    assert (folder / "model.safetensors").read_bytes() == fused_weights.read_bytes()


def test_gate_fails_the_build_and_passes_when_met(project: Path) -> None:
    text = project.read_text()
    project.write_text(text.replace("min_improvement = 0.0", "min_improvement = 5.0"))
    code, _, err = cli("make", str(project))
    assert code == 1
    assert "release:release: refused, 1 release gate(s) failed" in err
    assert "fuse:release on 'a': loss improvement vs base" in err and ">= 5" in err
    assert "Traceback" not in err

    project.write_text(text.replace("min_improvement = 0.0", "min_improvement = 0.001"))
    code, out, err = cli("make", str(project), "--json")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["built"] == ["release:release"]  # no retraining, no re-evaluation
    assert [g["passed"] for g in summary["gates"]] == [True, True]
    card = (project.parent / "out" / "release" / "release" / "README.md").read_text()
    assert ">= 0.001 | pass |" in card


def test_gate_without_a_release_still_fails_make(project: Path) -> None:
    text = project.read_text()
    text = text[: text.index("[[release]]")]
    project.write_text(text.replace("max_increase = 1.0", "max_loss = 0.5"))
    code, out, err = cli("make", str(project))
    assert code == 1
    assert "FAIL" in out and "release gate(s) failed" in err
    assert "fuse:release on 'general': loss" in err and "<= 0.5" in err


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("data = \"a\", min", "data = \"c\", min"), "gates[0].data: no dataset 'c'"),
        (("model = \"fuse:release\", data = \"a\"", "model = \"source:b\", data = \"a\""),
         "gates[0].model: 'source:b' is not evaluated here"),
        (("min_improvement = 0.0", "min_improvment = 0.0"), "did you mean 'min_improvement'"),
        (("seq_len = 16\ngates", "seq_len = 16\nreference = \"x\"\ngates"), "reference 'x'"),
        (("name = \"release\"\nlicense", "name = \"rel\"\nlicense"),
         "release[0].fuse: no [[fuse]] named 'rel'"),
    ],
)  # fmt: skip
def test_gate_and_release_mistakes_are_user_errors(
    tmp_path: Path, edit: tuple[str, str], expected: str
) -> None:
    recipe = write_project(tmp_path / "p")
    assert edit[0] in recipe.read_text()
    recipe.write_text(recipe.read_text().replace(*edit))
    code, _, err = cli("plan", str(recipe))
    assert code == 2 and expected in err, err


def test_card_takes_license_and_base_model_from_the_base(path_project: Path) -> None:
    base = path_project.parent / "models" / "base"
    (base / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# Tiny base\n")
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(cfg | {"_name_or_path": "acme/tiny-llama"}))
    path_project.write_text(path_project.read_text() + '\n[[release]]\nname = "release"\n')
    first = make(path_project)
    folder = path_project.parent / "out" / "release" / "release"
    front = read_front_matter((folder / "README.md").read_text())
    assert front["license"] == "mit" and front["base_model"] == "acme/tiny-llama"
    assert "base: a model folder" in (folder / "README.md").read_text()
    assert "release:release" in first.built

    # The base card is not part of the base's hash, but it is an input of the release.
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    assert make(path_project).built == ["release:release"]
    assert read_front_matter((folder / "README.md").read_text())["license"] == "apache-2.0"
