"""mergekit's parameter syntax, ``graftbuild import mergekit`` and incremental rebuilds of an
imported config (no mergekit needed: tests/test_mergekit_parity.py compares with it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from graftbuild.cli.app import main
from graftbuild.errors import UserError
from graftbuild.fusion import get_strategy, parse_strategy
from graftbuild.fusion.schedule import Bound, evaluate, layer_position
from graftbuild.recipe import load_recipe
from tests.helpers import load_weights, make

# --- the parameter syntax ----------------------------------------------------------------------


def test_gradients_interpolate_over_layers_and_filters_pick_by_name() -> None:
    assert evaluate([0.0, 1.0], "x", 0.25, "float") == pytest.approx(0.25)
    assert evaluate([0, 0.5, 0.3, 0.7, 1], "x", 0.5, "float") == pytest.approx(0.3)
    assert evaluate([0, 0.5, 0.3, 0.7, 1], "x", 0.625, "float") == pytest.approx(0.5)
    assert evaluate([True, False], "x", 0.4, "bool") is True  # discrete: index int(t · (n−1))
    filt = [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}]
    assert evaluate(filt, "model.layers.1.mlp.up_proj.weight", 1.0, "float") == 1.0
    assert evaluate(filt, "model.layers.1.self_attn.q_proj.weight", 1.0, "float") == 0.5
    assert evaluate([{"filter": "mlp", "value": 1}], "attn", 0.0, "float") is None  # falls through
    assert layer_position("model.layers.3.mlp.up_proj.weight", 4) == 1.0
    assert layer_position("model.layers.1.mlp.up_proj.weight", 4) == pytest.approx(1 / 3)
    assert layer_position("model.embed_tokens.weight", 4) == 0.0


def test_pack_values_win_over_options_and_weights_table_is_the_fallback() -> None:
    ties = get_strategy("ties")
    params = ties.Params.model_validate(
        parse_strategy("ties", {"density": 0.5, "weight": [{"filter": "mlp", "value": 2.0}]})
    )
    bound = Bound(params, [{"density": [0.2, 0.8]}, {}], num_layers=3, weights=[1.0, 0.3])
    _, per = bound.resolve("model.layers.1.self_attn.o_proj.weight")
    assert per[0]["density"] == pytest.approx(0.5) and per[1]["density"] == 0.5
    assert per[0]["weight"] == 1.0 and per[1]["weight"] == 0.3  # no filter matched: `weights`
    shared, per = bound.resolve("model.layers.2.mlp.up_proj.weight")
    assert per[0]["density"] == pytest.approx(0.8) and per[0]["weight"] == 2.0
    assert shared["normalize"] is True and shared["lambda"] == 1.0  # mergekit's defaults


def test_bad_settings_are_errors_naming_the_parameter() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unknown option 'dinsity'"):
        parse_strategy("ties", {"dinsity": 0.5})
    with pytest.raises(ValidationError, match="unknown keys \\['pattern'\\]"):
        parse_strategy("slerp", {"t": [{"pattern": "mlp", "value": 0.5}]})
    with pytest.raises(ValidationError, match="normalize: every point"):
        parse_strategy("ties", {"normalize": [1.0, 0.0]})
    with pytest.raises(ValidationError, match="`t` is required"):
        parse_strategy("slerp", {})
    with pytest.raises(ValidationError, match="seed"):
        parse_strategy("ties", {"seed": 3})  # not a random method


def test_ties_keeps_graftbuilds_rule_as_an_option() -> None:
    """mergekit keeps int(density·n) entries, graftbuild's rule round(density·n)."""
    ties = get_strategy("ties")
    d = torch.arange(1.0, 8.0)  # 7 entries; density 0.5: int -> 3, round -> 4
    base = torch.zeros(7)
    mk = ties.combine(base, [d], [1.0], ties.Params(density=0.5), "w")
    ours = ties.combine(base, [d], [1.0], ties.Params(density=0.5, rule="graftbuild"), "w")
    assert int((mk != 0).sum()) == 3 and int((ours != 0).sum()) == 4


# --- recipes -----------------------------------------------------------------------------------

RECIPE = """
[project]
name = "mk"
cache = "cache"

[base]
path = "models/base"

[compression.exact]
embed = "exact"
head = "exact"
attn = "exact"
mlp = "exact"

[sources.x]
path = "models/x"
compression = "{cx}"

[sources.y]
path = "models/y"
compression = "exact"

[[fuse]]
name = "m"
packs = ["x", "y"]
strategy = "{strategy}"
options = {{ {options} }}

[fuse.pack_options.x]
{xopts}
"""


def test_toml_recipes_take_schedules_filters_and_pack_options(path_project: Path) -> None:
    path_project.write_text(
        RECIPE.format(
            cx="exact",
            strategy="linear",
            options='dtype = "bfloat16"',
            xopts='weight = [{ filter = "mlp", value = [1.0, 3.0] }, { value = 1.0 }]',
        )
    )
    out = make(path_project).node("fuse:m").output
    w = load_weights(out)
    models = path_project.parent / "models"
    x, y = load_weights(models / "x"), load_weights(models / "y")
    assert all(t.dtype == torch.bfloat16 for t in w.values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    name = "model.layers.1.mlp.up_proj.weight"  # layer 1 of 2: t = 1, x's weight 3
    torch.testing.assert_close(w[name], ((3 * x[name] + y[name]) / 4).bfloat16())
    name = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(w[name], ((x[name] + y[name]) / 2).bfloat16())


def test_methods_that_read_models_need_lossless_packs(path_project: Path) -> None:
    path_project.write_text(
        RECIPE.format(cx="default", strategy="model_stock", options="", xopts="")
    )
    with pytest.raises(
        UserError, match=r"'model_stock' reads the sources' models.*'x' must be lossless"
    ):
        load_recipe(path_project)
    path_project.write_text(
        RECIPE.format(cx="exact", strategy="ties", options="", xopts="lambda = 2.0")
    )
    with pytest.raises(UserError, match="'lambda' is one value for all packs"):
        load_recipe(path_project)


# --- the importer ------------------------------------------------------------------------------


def run_import(cfg: dict | str, tmp: Path, *extra: str) -> tuple[int, str, Path]:
    src = tmp / "merge.yml"
    src.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False))
    out = tmp / "out" / "recipe.toml"
    res = CliRunner().invoke(main, ["import", "mergekit", str(src), "-o", str(out), *extra])
    return res.exit_code, res.output, out


def ties_config(models: Path) -> dict:
    return {
        "models": [
            {"model": "models/x", "parameters": {"weight": 0.7, "density": [0.9, 0.4]}},
            {"model": str(models / "y"), "parameters": {"weight": 0.3}},
        ],
        "merge_method": "ties",
        "base_model": "models/base",
        "parameters": {"density": 0.5, "normalize": True, "int8_mask": True},
        "dtype": "float32",
    }


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"modules": {}}, "modules: not supported"),
        ({"merge_method": "ram"}, "merge_method: 'ram'"),
        ({"base_model": "some-org/not-cached"}, "base_model: 'some-org/not-cached' is not a local"),
        ({"tokenizer_source": "union"}, "tokenizer_source: 'union'"),
        ({"parameters": {"t": 0.3}}, "unknown option 't'"),
        ({"models": [{"model": "models/x+lora/a"}]}, "LoRA references"),
    ],
)
def test_import_errors_name_the_key(path_project: Path, change: dict, needle: str) -> None:
    models = path_project.parent / "models"
    code, output, out = run_import(ties_config(models) | change, path_project.parent)
    assert code == 2, output
    assert needle in output and "merge.yml" in output
    assert not out.exists()


def test_import_stacks_layers_and_rejects_unknown_filter_keys(path_project: Path) -> None:
    stack = {
        "slices": [
            {"sources": [{"model": "models/x", "layer_range": [0, 2]}]},
            {"sources": [{"model": "models/y", "layer_range": [1, 2]}]},
        ],
        "merge_method": "passthrough",
    }
    code, output, recipe = run_import(stack, path_project.parent)
    assert code == 0, output
    out = make(recipe).node("fuse:merge").output
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    w = load_weights(out)
    y = load_weights(path_project.parent / "models" / "y")
    name = "model.layers.{}.mlp.down_proj.weight"
    torch.testing.assert_close(w[name.format(2)], y[name.format(1)])  # y's layer 1 on top
    torch.testing.assert_close(w["lm_head.weight"], y["lm_head.weight"])  # the last slice's
    stack["slices"][0]["parameters"] = {"scale": 2.0}
    code, output, _ = run_import(stack, path_project.parent, "--force")
    assert code == 2 and "slices[0].parameters" in output
    pattern = {
        "models": [{"model": "models/base"}, {"model": "models/x"}],
        "merge_method": "slerp",
        "base_model": "models/base",
        "parameters": {"t": [{"pattern": "mlp", "value": 0.2}, {"value": 0.5}]},
    }
    code, output, _ = run_import(pattern, path_project.parent, "--force")
    assert code == 2 and "unknown keys ['pattern']" in output


def test_hub_ids_resolve_through_the_local_cache_offline(
    path_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    models = path_project.parent / "models"
    hub = path_project.parent / "hf" / "hub" / "models--org--tiny-x"
    snap = hub / "snapshots" / "abc123"
    shutil.copytree(models / "x", snap)
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HOME", str(path_project.parent / "hf"))
    cfg = ties_config(models)
    cfg["models"][0]["model"] = "org/tiny-x"
    code, output, out = run_import(cfg, path_project.parent)
    assert code == 0, output
    recipe = load_recipe(out)
    assert recipe.sources["org--tiny-x"].path == snap.resolve()


def test_imported_config_rebuilds_incrementally(path_project: Path) -> None:
    """Change one model: only its pack and the fuse rebuild. Change one method parameter:
    only the fuse."""
    models = path_project.parent / "models"
    cfg = ties_config(models)
    code, output, recipe = run_import(cfg, path_project.parent)
    assert code == 0, output
    first = make(recipe)
    assert sorted(first.built) == [
        "base", "fuse:merge", "pack:x", "pack:y", "source:x", "source:y"
    ]  # fmt: skip
    assert make(recipe).built == []

    # A new fine-tune of y (another folder): y's pack and the fuse.
    import shutil

    from tests.conftest import make_source

    shutil.rmtree(models / "y")
    make_source(models / "y", models / "base", seed=7)
    assert sorted(make(recipe).built) == ["fuse:merge", "pack:y", "source:y"]

    # A method parameter: the fuse alone.
    cfg["parameters"]["density"] = 0.3
    code, output, recipe = run_import(cfg, path_project.parent, "--force")
    assert code == 0, output
    third = make(recipe)
    assert third.built == ["fuse:merge"]
    assert any(r.startswith("fusion options changed") for r in third.node("fuse:merge").reasons)


def test_make_builds_a_mergekit_yaml_directly(path_project: Path) -> None:
    """`graftbuild make CONFIG.yml`: the same bytes as the imported recipe's build."""
    models = path_project.parent / "models"
    code, output, recipe = run_import(ties_config(models), path_project.parent)
    assert code == 0, output
    imported = load_weights(make(recipe).node("fuse:merge").output)
    res = CliRunner().invoke(main, ["make", str(path_project.parent / "merge.yml"), "-q"])
    assert res.exit_code == 0, res.output
    direct = make(path_project.parent / "merge.yml").node("fuse:merge")
    assert direct.action == "reused"  # built by the command above, in the YAML's cache
    for name, t in load_weights(direct.output).items():
        assert torch.equal(t, imported[name])


def test_tokenizer_source_and_relative_paths(path_project: Path) -> None:
    """A model's tokenizer files go to the merged folder; models beside the recipe stay
    relative paths in it."""
    root = path_project.parent
    cfg_y = root / "models" / "y" / "tokenizer_config.json"
    cfg_y.write_text(json.dumps(json.loads(cfg_y.read_text()) | {"model_max_length": 77}))
    cfg = ties_config(root / "models") | {"tokenizer_source": "models/y"}
    src = root / "merge.yml"
    src.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(main, ["import", "mergekit", str(src), "-o", str(root / "r.toml")])
    assert res.exit_code == 0, res.output
    text = (root / "r.toml").read_text()
    assert 'path = "models/base"' in text and 'tokenizer_source = "y"' in text
    out = make(root / "r.toml").node("fuse:merge").output
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 77
