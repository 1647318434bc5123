"""A recipe that builds everything itself: seeded base, finetuned sources, packs, fuse, eval."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY_LLAMA, TOKENIZER
from helpers import make, plan

RECIPE = """
[project]
name = "ft"

[base]
config = "base_config.json"
tokenizer = "tokenizer"
seed = 3
finetune = { data = "general.txt", steps = 3, batch_size = 4, seq_len = 16 }

[sources.a]
finetune = { data = "a.txt", steps = 4, lr = 1e-3, batch_size = 4, seq_len = 16, seed = 1 }

[sources.b]
finetune = { data = "b.txt", steps = 4, lr = 1e-3, batch_size = 4, seq_len = 16, seed = 2 }

[[fuse]]
name = "release"
packs = ["a", "b"]

[[eval]]
name = "losses"
models = ["base", "source:a", "fuse:release"]
data = { a = "a_heldout.txt" }
seq_len = 16
"""


@pytest.fixture
def ft_project(tmp_path: Path) -> Path:
    (tmp_path / "base_config.json").write_text(json.dumps(TINY_LLAMA))
    shutil.copytree(TOKENIZER, tmp_path / "tokenizer")
    (tmp_path / "a.txt").write_text("".join(f"{i} + {i} = {2 * i}\n" for i in range(60)))
    (tmp_path / "b.txt").write_text("".join(f"def f{i}(x): return x * {i}\n" for i in range(60)))
    (tmp_path / "general.txt").write_text("".join(f"the cat sat on mat {i}\n" for i in range(40)))
    (tmp_path / "a_heldout.txt").write_text(
        "".join(f"{i} + {i} = {2 * i}\n" for i in range(60, 80))
    )
    recipe = tmp_path / "graftbuild.toml"
    recipe.write_text(RECIPE)
    return recipe


def test_finetune_chain_builds_and_rebuilds_one_source(ft_project: Path, tmp_path: Path) -> None:
    first = make(ft_project)
    assert first.built == [
        "base:init",
        "base",
        "source:a",
        "pack:a",
        "source:b",
        "pack:b",
        "fuse:release",
        "eval:losses",
    ]
    metrics = json.loads((first.node("eval:losses").output / "metrics.json").read_text())  # type: ignore[operator]
    assert set(metrics) == {"base", "source:a", "fuse:release"}
    # Training on the skill lowers its held-out loss against the random base.
    assert metrics["source:a"]["a"]["loss"] < metrics["base"]["a"]["loss"]

    assert make(ft_project).built == []

    with (tmp_path / "b.txt").open("a") as f:
        f.write("".join(f"def g{i}(x): return x - {i}\n" for i in range(20)))
    p = plan(ft_project)
    assert p["source:b"].reasons == ["source 'b' training data changed"]
    assert p["source:a"].state == "fresh"
    result = make(ft_project)
    assert result.built == ["source:b", "pack:b", "fuse:release", "eval:losses"]

    # Finetune settings are part of the key, spelled-out defaults are not a change.
    ft_project.write_text(
        ft_project.read_text().replace("seed = 2 }", "seed = 2, weight_decay = 0.0 }")
    )
    assert make(ft_project).built == []


def test_two_clean_builds_give_identical_bytes(ft_project: Path, tmp_path: Path) -> None:
    one = make(ft_project, cache=tmp_path / "cache1")
    shutil.rmtree(tmp_path / "out")
    two = make(ft_project, cache=tmp_path / "cache2")
    assert two.built == one.built
    assert [n.output_hash for n in one.nodes] == [n.output_hash for n in two.nodes]
