"""Pre-flight: every model's config and safetensors headers are read before any node runs; a
source that does not fit the base is refused then, what is legitimate passes; ``plan`` shows an
estimate of each node's cost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import PATH_RECIPE, TINY_LLAMA, make_base, make_source
from helpers import make, plan

from graftbuild.cli.app import main
from graftbuild.errors import UserError

QUICK = Path(__file__).resolve().parents[1] / "recipes" / "quickstart"


def _int8(folder: Path) -> None:
    """One weight stored quantised (int8), as a quantised checkpoint would be."""
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    state[name] = (state[name] * 127).round().clamp(-127, 127).to(torch.int8)
    save_file(state, str(folder / "model.safetensors"))


def _added_rows_and_buffer(folder: Path) -> None:
    """Two added tokens (embedding and head rows) and a non-float buffer: both legitimate."""
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        state[k] = torch.cat([state[k], torch.randn(2, state[k].shape[1])])
    state["model.rotary.position_ids"] = torch.arange(8)
    save_file(state, str(folder / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"vocab_size": cfg["vocab_size"] + 2}))


MISMATCHES = {
    "layers": (
        TINY_LLAMA | {"num_hidden_layers": 3},
        None,
        r"layer count .* is 3, the base's is 2",
    ),
    "hidden": (TINY_LLAMA | {"hidden_size": 48}, None, r"hidden size is 48, the base's is 32"),
    "vocab": (TINY_LLAMA | {"vocab_size": 500}, None, r"vocabulary \(vocab_size\) is 500"),
    "tied": (TINY_LLAMA | {"tie_word_embeddings": True}, None, r"tie_word_embeddings"),
    "dtype": (None, _int8, r"'.*up_proj.weight' has non-float dtype I8 where the base has F32"),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_a_mismatched_source_is_refused_before_any_node_ran(case: str, tmp_path: Path) -> None:
    config, edit, message = MISMATCHES[case]
    models = tmp_path / "models"
    make_base(models / "base")
    if config is not None:
        make_base(models / "x", seed=1, config=config)
    else:
        make_source(models / "x", models / "base", seed=1)
    if edit is not None:
        edit(models / "x")
    make_source(models / "y", models / "base", seed=2)
    # y is a source that would train first: nothing may run before x is refused
    recipe = tmp_path / "graftbuild.toml"
    recipe.write_text(
        PATH_RECIPE.replace(
            'path = "models/y"',
            f'finetune = {{ data = "{QUICK}/data/code.train.txt", steps = 2 }}',
        )
    )
    with pytest.raises(UserError, match=r"sources\.x .*" + message) as e:
        make(recipe)
    assert "refused before anything was built" in str(e.value)
    assert not list((tmp_path / "cache").glob("objects/*/*"))
    assert not (tmp_path / "out").exists()


def test_added_tokens_and_buffers_pass_preflight(path_project: Path) -> None:
    _added_rows_and_buffer(path_project.parent / "models" / "x")
    assert plan(path_project)["pack:x"].state == "stale"


def test_plan_shows_an_estimate_per_node(path_project: Path) -> None:
    result = CliRunner().invoke(main, ["plan", str(path_project), "--json"])
    assert result.exit_code == 0, result.output
    est = json.loads(result.stdout)["estimates"]
    base = sum(
        f.stat().st_size for f in (path_project.parent / "models" / "base").glob("*.safetensors")
    )
    fuse = est["fuse:release"]
    assert 0.9 * base <= fuse["written"] <= 1.1 * base  # a fused model the size of the base
    assert 0 < est["pack:x"]["written"] < base / 2 and est["pack:x"]["peak"] > 0
    assert fuse["seconds"] is not None
    result = CliRunner().invoke(main, ["plan", str(path_project)])
    assert "peak mem" in result.stdout and "writes" in result.stdout
    shutil.rmtree(path_project.parent / "cache", ignore_errors=True)
