"""``graftbuild init``: the text of a commented starter recipe for a base and its fine-tunes.

Paths are written relative to the recipe's folder, so the project can move as a whole. The
compression section leads with ``budget``: the built-in per-role defaults fit full fine-tunes
(every weight moved); a LoRA fine-tune's delta is low-rank and small, and a budget sized for it
is what keeps its pack small.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from graftbuild.recipe import ids

HEADER = """\
# graftbuild recipe, written by `graftbuild init`. Edit freely:
#   graftbuild plan {recipe}    # what would be built and why, with cost estimates
#   graftbuild make {recipe}    # build what is stale (everything, the first time)
# Reference: README.md "Recipe reference"; fusion strategies: docs/FUSION.md.

[project]
name = {name}
version = "0.1.0"
# cache = "cache"             # content-addressed store (default: cache/ beside this file)
# out = "out"                 # where built artifacts appear (default: out/ beside this file)

[base]
{base}
# or: model = "org/name"      # a Hugging Face id, read from the local HF cache (never downloaded)

# How each source's delta (fine-tune minus base) is compressed into its SkillPack.
# Size first: `budget` is the pack's size as a fraction of the fp16 delta; ranks and keep
# fractions are then allocated across tensors where they remove the most error per byte.
# The per-role defaults below fit FULL fine-tunes (every weight moved). For a LoRA fine-tune
# (a low-rank delta) they spend far more than the delta needs: set a small budget, e.g.
# budget = 0.01, and compare `graftbuild inspect pack:NAME` before and after.
[compression.default]
# budget = 0.0625
# embed = {{ method = "prune", keep = 0.1 }}     # keep the largest 10% of entries
# head  = {{ method = "prune", keep = 0.1 }}
# attn  = {{ method = "lowrank", energy = 0.9 }}  # or rank = 16
# mlp   = {{ method = "mixed", bands = [ {{ fraction = 0.01, bits = 8 }},
#                                       {{ fraction = 0.05, bits = 4 }},
#                                       {{ fraction = 0.30, bits = 2 }} ] }}
# calibration = {{ data = "calib.txt", samples = 128, seq_len = 64 }}   # GPTQ on base activations
"""

SOURCE = """
[sources.{name}]
{path}
# compression = "default"     # a [compression.NAME] profile
"""

FUSE = """
# One model with every skill grafted in. With several full fine-tunes a plain sum overshoots;
# weights of 1/n (task arithmetic) are a safer start. strategy: sum | ties | dare | routed.
[[fuse]]
name = "release"
packs = {packs}
strategy = "sum"
weights = {weights}

# Held-out metrics of the models (loss and perplexity for causal LMs; for an encoder, a .jsonl
# of {{"query": ..., "doc": ...}} rows gives retrieval MRR and recall@1):
# [[eval]]
# name = "heldout"
# models = {models}
# data = {{ general = "heldout.txt" }}

# A release folder: the fused model, a model card and a manifest of file hashes.
# [[release]]
# name = "release"
# license = "apache-2.0"
"""


def _rel(path: Path, root: Path) -> str:
    return json.dumps(Path(os.path.relpath(path.resolve(), root.resolve())).as_posix())


def render(recipe: Path, base: Path | None, sources: list[tuple[str, Path]]) -> str:
    """A starter recipe at ``recipe`` for ``base`` and ``sources`` (placeholders where absent:
    the recipe is then valid TOML that names what to fill in)."""
    root = recipe.parent
    base_line = (
        f"path = {_rel(base, root)}         # a Hugging Face model folder (safetensors)"
        if base is not None
        else 'path = "path/to/base"      # TODO: a Hugging Face model folder (safetensors)'
    )
    text = HEADER.format(
        recipe=recipe.name, name=json.dumps(root.resolve().name or "project"), base=base_line
    )
    if not sources:
        text += SOURCE.format(
            name="skill", path='path = "path/to/finetune"   # TODO: a fine-tune of the base'
        )
        names = ["skill"]
    else:
        for name, path in sources:
            text += SOURCE.format(name=name, path=f"path = {_rel(path, root)}")
        names = [n for n, _ in sources]
    share = round(1 / len(names), 3)
    weights = "{ " + ", ".join(f"{n} = {share if len(names) > 1 else 1.0}" for n in names) + " }"
    models = json.dumps([ids.BASE, *(ids.source(n) for n in names), ids.fuse("release")])
    return text + FUSE.format(packs=json.dumps(names), weights=weights, models=models)
