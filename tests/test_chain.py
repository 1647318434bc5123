"""Continual chains: ``parent`` sources are packed against base ⊕ their parent chain, and adding
a pack later never rebuilds or changes the earlier ones."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, make_base, make_source
from helpers import load_weights, make, plan

from graftbuild.errors import UserError
from graftbuild.recipe import load_recipe
from graftbuild.runtime import GraftedModel

DATA = REPO / "recipes" / "quickstart" / "data"

HEAD = """
[project]
name = "chain"

[base]
path = "models/base"

[compression.default]
embed = "exact"
head = "exact"
attn = "exact"
mlp = "exact"

[sources.a]
path = "models/a"

[sources.b]
path = "models/b"
parent = "a"
"""

C = """
[sources.c]
path = "models/c"
parent = "b"
"""

FUSE = f"""
[[fuse]]
name = "all"
packs = ["a", "b", "c"]

[[fuse]]
name = "routed"
packs = ["a", "b", "c"]
strategy = "routed"
[fuse.options.prompts]
a = "{DATA}/arith.train.txt"
b = "{DATA}/code.train.txt"
c = "{DATA}/lang.train.txt"
"""


@pytest.fixture(scope="module")
def chain_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """a from the base, b fine-tuned from a, c from b (synthetic fine-tunes)."""
    root = tmp_path_factory.mktemp("chain_models")
    make_base(root / "base")
    make_source(root / "a", root / "base", seed=11)
    make_source(root / "b", root / "a", seed=12)
    make_source(root / "c", root / "b", seed=13)
    return root


def test_chain_packs_against_parent_and_keeps_earlier_bytes(
    tmp_path: Path, chain_models: Path
) -> None:
    shutil.copytree(chain_models, tmp_path / "models")
    recipe = tmp_path / "graftbuild.toml"
    recipe.write_text(HEAD)
    first = make(recipe)
    assert {"pack:a", "pack:b", "graft:a"} <= set(first.built)
    assert "graft:b" not in plan(recipe)  # only parents get a graft node
    before = {
        p: (first.node(f"pack:{p}").output / "skillpack.safetensors").read_bytes() for p in "ab"
    }

    recipe.write_text(HEAD + C + FUSE)
    second = make(recipe)
    assert set(second.built) == {"pack:c", "source:c", "graft:b", "fuse:all", "fuse:routed"}
    for p, data in before.items():
        assert (second.node(f"pack:{p}").output / "skillpack.safetensors").read_bytes() == data

    # Exact packs: base ⊕ a ⊕ b ⊕ c is c's own checkpoint, and graft:b is b's.
    c = load_weights(tmp_path / "models" / "c")
    fused = load_weights(second.node("fuse:all").output)
    for n, v in c.items():
        torch.testing.assert_close(fused[n], v, rtol=1e-5, atol=1e-5)
    from graftbuild.cache.store import Store

    graft_b = Store(tmp_path / "cache").object_path(second.node("graft:b").output_hash)
    b = load_weights(tmp_path / "models" / "b")
    for n, v in load_weights(graft_b).items():
        torch.testing.assert_close(v, b[n], rtol=1e-5, atol=1e-5)

    # In the bundle, activating a pack brings its chain: each model exactly as the user had it.
    g = GraftedModel.from_pretrained(second.node("fuse:routed").output)
    for name, want in (("b", b), ("a", load_weights(tmp_path / "models" / "a")), ("c", c)):
        g.activate(name)
        assert g.active == g.chain(name)
        state = g.model.state_dict()
        for n, v in want.items():
            torch.testing.assert_close(state[n], v, rtol=1e-5, atol=1e-5)


def test_chain_errors_are_user_errors(tmp_path: Path) -> None:
    recipe = tmp_path / "graftbuild.toml"
    recipe.write_text(HEAD.replace('parent = "a"', 'parent = "aa"'))
    with pytest.raises(UserError, match=r"sources\.b\.parent: no source 'aa' \(did you mean 'a'"):
        load_recipe(recipe)
    recipe.write_text(
        HEAD.replace('[sources.a]\npath = "models/a"', '[sources.a]\npath = "m"\nparent = "b"')
    )
    with pytest.raises(UserError, match="cycle"):
        load_recipe(recipe)
    recipe.write_text(HEAD + '\n[[fuse]]\nname = "f"\npacks = ["b"]\n')
    with pytest.raises(UserError, match="add 'a' to `packs`"):
        load_recipe(recipe)


def test_finetuned_child_trains_from_its_parents_graft(tmp_path: Path) -> None:
    from graftbuild.build.graph import build_graph

    recipe = tmp_path / "graftbuild.toml"
    recipe.write_text(
        HEAD.replace(
            'path = "models/a"', f'finetune = {{ data = "{DATA}/arith.train.txt", steps = 1 }}'
        ).replace(
            'path = "models/b"', f'finetune = {{ data = "{DATA}/code.train.txt", steps = 1 }}'
        )
        + '\n[[eval]]\nname = "e"\nmodels = ["graft:a"]\ndata = { arith = "x.txt" }\n'
    )
    g = build_graph(load_recipe(recipe))
    assert g.node("source:a").deps == {"base": "base"}
    assert g.node("source:b").deps == {"base": "graft:a"}
    assert g.node("pack:b").deps == {"base": "base", "source": "source:b", "parent": "graft:a"}
    assert g.node("graft:a").deps == {"base": "base", "pack.0": "pack:a"}
    assert g.node("eval:e").deps == {"model.0": "graft:a"}
