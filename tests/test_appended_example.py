"""The README's incremental example: one line appended to a skill's training data is trained on
(the last partial chunk is padded, not dropped), so the source, its pack, the fused model and
the eval rebuild."""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import REPO
from helpers import make, plan

QUICK = REPO / "recipes" / "quickstart"
RECIPE = f"""
[project]
name = "tail"

[base]
config = "{QUICK}/base_config.json"
tokenizer = "{QUICK}/tokenizer"

[sources.arith]
finetune = {{ data = "arith.train.txt", epochs = 1, lr = 1e-3, batch_size = 16, seq_len = 64 }}

[[fuse]]
name = "release"
packs = ["arith"]

[[eval]]
name = "skills"
models = ["base", "fuse:release"]
data = {{ arith = "heldout.txt" }}
"""


def test_an_appended_example_rebuilds_the_chain(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from graftbuild.weights.textdata import read_examples, training_chunks

    data = tmp_path / "arith.train.txt"
    lines = (QUICK / "data" / "arith.train.txt").read_text().splitlines(keepends=True)
    data.write_text("".join(lines[:40]))
    heldout = (QUICK / "data" / "arith.heldout.txt").read_text().splitlines(keepends=True)
    (tmp_path / "heldout.txt").write_text("".join(heldout[:20]))
    recipe = tmp_path / "graftbuild.toml"
    recipe.write_text(RECIPE)
    make(recipe)

    with data.open("a") as f:  # as the README does it
        f.write("5 + 5 = 10\n")
    tok = AutoTokenizer.from_pretrained(str(QUICK / "tokenizer"))
    chunks = training_chunks(tok, read_examples(data), 64)
    tail = tok.decode(chunks[-1])
    assert len(chunks[-1]) < 64 and "5 + 5 = 10" in tail  # only a kept partial chunk has it

    nodes = plan(recipe)
    assert "source 'arith' training data changed" in nodes["source:arith"].reasons
    result = make(recipe)
    assert result.built == ["source:arith", "pack:arith", "fuse:release", "eval:skills"]
    shutil.rmtree(tmp_path / "cache")
