"""The one engine: plan, local make and Ray make share one visit; component versions are in keys;
a node kind, a codec or a strategy is one module plus one registry line; --keep-going for every
runner."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import ClassVar

import pytest
from conftest import PATH_RECIPE, make_nan_source, write_recipe
from helpers import engine, make, plan

import graftbuild.build.engine as engine_module
from graftbuild.build.runners import RUNNERS, make_runner
from graftbuild.compress.codecs import CODECS
from graftbuild.errors import BuildError, UserError
from graftbuild.fusion import STRATEGIES
from graftbuild.recipe import ids
from graftbuild.steps import STEPS
from graftbuild.steps.base import Node, StepContext


def keys(recipe: Path) -> dict[str, str | None]:
    return {n.id: n.key for n in make(recipe).nodes}


def test_a_rule_changed_in_the_engine_shows_in_plan_and_local_make(
    path_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The restore reason is worded in one place; plan and make both say it (Ray: test_ray)."""
    make(path_project)
    shutil.rmtree(path_project.parent / "out" / "fused")
    monkeypatch.setattr(engine_module, "restore_reason", lambda node, why: f"RULE {why}")
    assert plan(path_project)["fuse:release"].reasons == ["RULE missing"]
    result = make(path_project).node("fuse:release")
    assert (result.action, result.reasons) == ("restored", ["RULE missing"])
    assert (path_project.parent / "out" / "fused" / "release" / "model.safetensors").is_file()


def test_plan_and_make_agree_on_every_node(path_project: Path) -> None:
    """A plan is the make loop over the dry runner: what it calls fresh, make reuses."""
    make(path_project)
    (path_project.parent / "models" / "x" / "extra.json").write_text("{}")  # source:x changes
    planned = plan(path_project)
    result = make(path_project)
    for n in result.nodes:
        if planned[n.id].state == "fresh":
            assert n.action == "reused", n.id
    assert planned["source:x"].state == "stale" and "source:x" in result.built
    # the pack's delta is unchanged, so it is rebuilt to the same bytes and the fuse is reused
    assert planned["fuse:release"].reasons == [
        "pack:x is stale (reused if it rebuilds to the same bytes)"
    ]
    assert result.node("fuse:release").action == "reused"


def test_bumping_a_codec_version_changes_exactly_the_packs_that_use_it(
    path_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pack:x's profile uses lowrank (attn), prune and mixed; pack:y's is all exact. Bumping
    lowrank changes pack:x's key and, through pack:x's new bytes (each entry records its codec
    version), the fuse's; nothing else."""
    before = keys(path_project)
    monkeypatch.setattr(type(CODECS["lowrank"]), "version", CODECS["lowrank"].version + 1)
    p = plan(path_project)
    assert p["pack:x"].reasons == ["codec 'lowrank' changed (version 1 -> 2)"]
    assert p["pack:y"].state == "fresh"
    after = make(path_project)
    changed = {n.id for n in after.nodes if n.key != before[n.id]}
    assert changed == {"pack:x", "fuse:release"}
    assert after.built == ["pack:x", "fuse:release"]


def test_bumping_the_exact_codec_leaves_packs_that_do_not_name_it(
    path_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = keys(path_project)
    monkeypatch.setattr(type(CODECS["exact"]), "version", CODECS["exact"].version + 1)
    after = engine(path_project).make()
    changed = {n.id for n in after.nodes if n.key != before[n.id]}
    # both profiles store norms exactly (the default's norm and other roles are exact)
    assert {"pack:x", "pack:y"} <= changed
    assert not changed & {"base", "source:x", "source:y"}


def test_bumping_a_strategy_version_changes_exactly_its_fuse_nodes(
    path_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = path_project.read_text() + (
        '\n[[fuse]]\nname = "trimmed"\npacks = ["x", "y"]\nstrategy = "ties"\n'
    )
    path_project.write_text(text)
    before = keys(path_project)
    monkeypatch.setattr(type(STRATEGIES["ties"]), "version", STRATEGIES["ties"].version + 1)
    p = plan(path_project)
    assert p["fuse:trimmed"].reasons[0].startswith("strategy 'ties' changed (version")
    assert p["fuse:release"].state == "fresh"
    after = make(path_project)
    assert {n.id for n in after.nodes if n.key != before[n.id]} == {"fuse:trimmed"}
    assert after.built == ["fuse:trimmed"]


def test_the_lock_records_component_versions(path_project: Path) -> None:
    import json

    make(path_project)
    lock = json.loads(path_project.with_suffix(".lock").read_text())["nodes"]
    assert lock["pack:x"]["components"] == {
        "codec:exact": CODECS["exact"].version,
        "codec:lowrank": CODECS["lowrank"].version,
        "codec:mixed": CODECS["mixed"].version,
        "codec:prune": CODECS["prune"].version,
        "codec:zero": CODECS["zero"].version,  # any all-zero delta, whatever the profile
    }
    assert lock["pack:y"]["components"] == {
        "codec:exact": CODECS["exact"].version,
        "codec:zero": CODECS["zero"].version,
    }
    assert lock["fuse:release"]["components"] == {"strategy:sum": STRATEGIES["sum"].version}
    assert "components" not in lock["source:x"]


def test_locked_make_names_a_component_that_differs(
    path_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make(path_project)
    monkeypatch.setattr(type(STRATEGIES["sum"]), "version", STRATEGIES["sum"].version + 1)
    with pytest.raises(UserError, match=r"fuse:release: strategy:sum is version 2 here and 1"):
        engine(path_project).make(locked=True)


BAD = """
[sources.bad]
path = "models/bad"
"""


def failing_project(root: Path, model_folders: Path) -> Path:
    shutil.copytree(model_folders, root / "models")
    # a source that passes pre-flight (same architecture) and fails in its pack step
    make_nan_source(root / "models" / "bad", root / "models" / "x")
    text = PATH_RECIPE.replace('packs = ["x", "y"]', 'packs = ["x", "bad"]')
    text = text.replace("weights = { x = 1.0, y = 0.5 }", "weights = { x = 1.0 }")
    text += BAD + '\n[[fuse]]\nname = "good"\npacks = ["y"]\n'
    return write_recipe(root / "graftbuild.toml", text)


def test_local_runner_stops_at_the_first_failure(tmp_path: Path, model_folders: Path) -> None:
    recipe = failing_project(tmp_path, model_folders)
    with pytest.raises(UserError, match=r"^pack:bad: .*NaN or Inf in the delta"):
        make(recipe)
    p = plan(recipe)
    assert p["pack:bad"].state == "stale" and p["fuse:release"].state == "stale"


def test_keep_going_builds_everything_not_below_the_failure(
    tmp_path: Path, model_folders: Path
) -> None:
    recipe = failing_project(tmp_path, model_folders)
    with pytest.raises(UserError, match=r"^pack:bad: "):
        engine(recipe).make(keep_going=True)
    p = plan(recipe)
    assert p["pack:bad"].state == p["fuse:release"].state == "stale"
    for node in ("pack:x", "pack:y", "fuse:good"):
        assert p[node].state == "fresh", node


def test_runner_options_are_checked_against_the_runner() -> None:
    assert set(RUNNERS) == {"local", "ray"}
    wrong = r"--address: an option of --executor ray, not of --executor local"
    with pytest.raises(UserError, match=wrong):
        make_runner("local", address="h:6379")
    assert make_runner("ray", address="h:6379").address == "h:6379"  # type: ignore[attr-defined]


class CountStep:
    """A node kind made for this test: counts the lines of a file (one module's worth)."""

    name: ClassVar[str] = "count"
    version: ClassVar[int] = 1
    uses_accelerator: ClassVar[bool] = False

    def nodes(self, recipe, out):  # type: ignore[no-untyped-def]
        node = Node(ids.node_id("count", "lines"), "count", deps={"after": ids.BASE})
        node.files = {"data": recipe.root / "lines.txt"}
        node.output = out / "count"
        return [node]

    def run(self, ctx: StepContext) -> None:
        n = len(ctx.files["data"].read_text().splitlines())
        (ctx.out / "count.txt").write_text(f"{n}\n")


def test_a_new_node_kind_is_one_step_and_one_registry_line(
    path_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (path_project.parent / "lines.txt").write_text("a\nb\n")
    monkeypatch.setitem(STEPS, "count", CountStep())
    result = make(path_project, ["count:lines"])
    assert result.built[-1] == "count:lines"
    assert (path_project.parent / "out" / "count" / "count.txt").read_text() == "2\n"
    (path_project.parent / "lines.txt").write_text("a\nb\nc\n")
    assert plan(path_project)["count:lines"].reasons == ["file 'data' changed"]
    assert make(path_project, ["count:lines"]).built == ["count:lines"]


def test_every_kind_declares_its_accelerator_use() -> None:
    assert {s for s, step in STEPS.items() if step.uses_accelerator} == {
        "init", "sft", "teach", "dpo", "pack", "fuse", "bundle", "eval",
    }  # fmt: skip
    assert not STEPS["input"].uses_accelerator and not STEPS["release"].uses_accelerator


def test_an_input_node_is_never_run(tmp_path: Path) -> None:
    ctx = StepContext("base", {}, {}, {}, {}, tmp_path)
    with pytest.raises(BuildError, match="not built"):
        STEPS["input"].run(ctx)
