"""Routed bundles: the build writes base + packs + router; GraftedModel switches packs in place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO
from helpers import make

from graftbuild.build.engine import Engine, cache_dir
from graftbuild.cache.store import Store
from graftbuild.errors import UserError
from graftbuild.recipe import load_recipe
from graftbuild.runtime import GraftedModel

DATA = REPO / "recipes" / "quickstart" / "data"

RECIPE = f"""
[project]
name = "r"

[base]
path = "models/base"

[sources.x]
path = "models/x"

[sources.y]
path = "models/y"

[[fuse]]
name = "bundle"
packs = ["x", "y"]
strategy = "routed"
weights = {{ y = 0.5 }}
[fuse.options]
base_prompts = "{DATA}/lang.train.txt"
prompts = {{ x = "{DATA}/arith.train.txt", y = "PROMPTS_Y" }}
# x and y are random perturbations with no skill: these tests check the classifier and the
# switching, each domain to its own pack (tests/test_router_options.py: choosing by loss)
select = "domain"

[[fuse]]
name = "x"
packs = ["x"]

[[fuse]]
name = "y"
packs = ["y"]
weights = {{ y = 0.5 }}

[[fuse]]
name = "xy"
packs = ["x", "y"]
weights = {{ y = 0.5 }}
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, model_folders: Path) -> dict:
    import shutil

    root = tmp_path_factory.mktemp("routed")
    shutil.copytree(model_folders, root / "models")
    recipe = root / "graftbuild.toml"
    recipe.write_text(RECIPE.replace("PROMPTS_Y", str(DATA / "code.train.txt")))
    result = make(recipe)
    return {"recipe": recipe, "result": result, "root": root}


def _logits(model: object, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits  # type: ignore[operator]


def _load(folder: Path) -> object:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()


def test_bundle_layout_and_pack_bytes(built: dict) -> None:
    res = built["result"]
    out = res.node("fuse:bundle").output
    doc = json.loads((out / "bundle.json").read_text())
    assert [p["name"] for p in doc["packs"]] == ["x", "y"]
    assert [p["weight"] for p in doc["packs"]] == [1.0, 0.5]
    assert doc["router"]["classes"] == ["x", "y", ""]
    for name in ("x", "y"):
        pack = res.node(f"pack:{name}").output / "skillpack.safetensors"
        assert (out / "packs" / f"{name}.safetensors").read_bytes() == pack.read_bytes()
    assert (out / "base" / "config.json").is_file()
    assert "fuse:bundle" not in load_recipe(built["recipe"]).model_ids()


def test_switching_in_place_matches_fused_models(built: dict) -> None:
    res, root = built["result"], built["root"]
    g = GraftedModel.from_pretrained(res.node("fuse:bundle").output)
    ids = torch.arange(1, 25).unsqueeze(0)
    base = _logits(_load(root / "models" / "base"), ids)
    torch.testing.assert_close(_logits(g, ids), base)
    for active, fuse in ((["x"], "x"), (["y"], "y"), (["x", "y"], "xy"), ("x", "x")):
        g.activate(active)
        assert g.active == ([active] if isinstance(active, str) else active)
        want = _logits(_load(res.node(f"fuse:{fuse}").output), ids)
        torch.testing.assert_close(_logits(g, ids), want, rtol=1e-4, atol=1e-4)
    with g.using(["y"]):
        assert g.active == ["y"]
    assert g.active == ["x"]
    g.activate([])
    torch.testing.assert_close(_logits(g, ids), base, rtol=1e-5, atol=1e-5)
    g.activate("y")
    g.reset()
    assert g.active == []
    torch.testing.assert_close(_logits(g, ids), base, rtol=0, atol=0)
    with pytest.raises(UserError, match="no pack 'z'"):
        g.activate(["z"])


def test_router_picks_the_right_pack_on_heldout_prompts(built: dict) -> None:
    g = GraftedModel.from_pretrained(built["result"].node("fuse:bundle").output)
    g.activate("x")  # routing must not depend on what is active
    want = {"arith": ["x"], "code": ["y"], "lang": []}
    total = correct = 0
    for d, packs in want.items():
        prompts = (DATA / f"{d}.heldout.txt").read_text().splitlines()[:60]
        routes = g.route(prompts)
        correct += sum(r == packs for r in routes)
        total += len(prompts)
    assert g.active == ["x"]
    assert correct / total >= 0.95, correct / total


def test_generate_routes_each_prompt(built: dict) -> None:
    from transformers import AutoTokenizer

    res, root = built["result"], built["root"]
    g = GraftedModel.from_pretrained(res.node("fuse:bundle").output)
    prompts = ["12 + 7 =", "def add_1(n):", "print(sorted([4, 1]))", "kesari koveku boroni"]
    routes = g.route(prompts)
    assert routes[0] == ["x"] and routes[1] == ["y"]
    texts = g.generate(prompts, max_new_tokens=6)
    assert g.active == []
    folders = {"x": res.node("fuse:x").output, "y": res.node("fuse:y").output}
    tok = AutoTokenizer.from_pretrained(str(root / "models" / "base"))
    for prompt, route, text in zip(prompts, routes, texts, strict=True):
        model = _load(folders[route[0]] if route else root / "models" / "base")
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        gen = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
        assert text == tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)


def test_router_prompts_are_in_the_key(built: dict, tmp_path: Path) -> None:
    recipe = built["recipe"]
    other = tmp_path / "y_prompts.txt"
    other.write_text("\n".join((DATA / "code.train.txt").read_text().splitlines()[:40]) + "\n")
    recipe.write_text(RECIPE.replace("PROMPTS_Y", str(other)))
    r = load_recipe(recipe)
    stale = [n.id for n in Engine(r, Store(cache_dir(r))).plan() if n.state == "stale"]
    assert stale == ["fuse:bundle"]
    recipe.write_text(RECIPE.replace("PROMPTS_Y", str(DATA / "code.train.txt")))


def test_routed_needs_prompts_for_path_sources(path_project: Path) -> None:
    path_project.write_text(
        RECIPE.replace("prompts = { x = ", "prompts = { q = ").replace(
            "PROMPTS_Y", str(DATA / "code.train.txt")
        )
    )
    with pytest.raises(UserError, match=r"not in `packs`: \['q'\]"):
        Engine(load_recipe(path_project), Store(path_project.parent / "c"))
    path_project.write_text(
        RECIPE.replace(f'x = "{DATA}/arith.train.txt", ', "").replace(
            "PROMPTS_Y", str(DATA / "code.train.txt")
        )
    )
    with pytest.raises(UserError, match="pack 'x' has no prompts"):
        Engine(load_recipe(path_project), Store(path_project.parent / "c"))


def test_route_scores_and_logged_routes(built: dict) -> None:
    g = GraftedModel.from_pretrained(built["result"].node("fuse:bundle").output)
    prompts = ["12 + 7 =", "def add_1(n):", "the dog runs in the park ."]
    routes, scores = g.route(prompts, return_scores=True)
    assert routes == g.route(prompts)
    for route, s in zip(routes, scores, strict=True):
        assert set(s) == {"x", "y", "x+y", "base"} and abs(sum(s.values()) - 1.0) < 1e-5
        assert s["x+y"] == 0.0  # select = "domain": no domain is served by the mix
        best = max(s, key=s.__getitem__)
        assert route == ([] if best == "base" else [best])  # the route is the most probable
    lines: list[str] = []
    g.generate(prompts[:2], max_new_tokens=2, log_routes=lines.append)
    assert len(lines) == 2
    assert lines[0].startswith("route 0: '12 + 7 =' -> ['x'] (x ") and "base " in lines[0]
