"""The routed bundle's router chooses, per domain, among no pack, each pack and a mix of packs,
by the loss each option gives on that domain's held-out prompts (issue 22).

Real fine-tunes of a tiny Llama trained in the build: the base learns plain English (``general``),
``x`` then learns arithmetic and ``y`` Python-like code, lightly (60 steps). With these, the
answer per domain is known and was checked against models fused by the ``sum`` step: English is
served best by the base, code by ``y`` alone, and arithmetic by the mix ``x+y`` (code's
fine-tune also teaches digits and operators, so the sum beats ``x`` alone).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_LLAMA, TOKENIZER
from helpers import make

from graftbuild.build.engine import Engine, cache_dir
from graftbuild.cache.store import Store
from graftbuild.errors import UserError
from graftbuild.recipe import load_recipe
from graftbuild.runtime import GraftedModel

DATA = REPO / "recipes" / "quickstart" / "data"
CHOOSE = 48  # held-out prompts per domain: the last 48 lines of each file

RECIPE = f"""
[project]
name = "options"

[base]
config = "config.json"
tokenizer = "{TOKENIZER}"
seed = 0
finetune = {{ data = "{DATA}/general.train.txt", steps = 120, lr = 3e-3, batch_size = 16 }}

[sources.x]
finetune = {{ data = "{DATA}/arith.train.txt", steps = 60, lr = 3e-3, batch_size = 16, seed = 1 }}

[sources.y]
finetune = {{ data = "{DATA}/code.train.txt", steps = 60, lr = 3e-3, batch_size = 16, seed = 2 }}

[[fuse]]
name = "bundle"
packs = ["x", "y"]
strategy = "routed"
[fuse.options]
base_prompts = "general.txt"
samples = 128
choose_samples = {CHOOSE}
EXTRA

# a recipe written before options existed: no general domain, defaults everywhere
[[fuse]]
name = "old"
packs = ["x", "y"]
strategy = "routed"

# the mix fused by TIES instead of a sum: stored in the bundle as one delta
[[fuse]]
name = "tiesmix"
packs = ["x", "y"]
strategy = "routed"
options = {{ mix_strategy = "ties", mix_options = {{ density = 0.5 }}, select = "domain" }}

[[fuse]]
name = "ties"
packs = ["x", "y"]
strategy = "ties"
options = {{ density = 0.5 }}

[[fuse]]
name = "fx"
packs = ["x"]

[[fuse]]
name = "fy"
packs = ["y"]

[[fuse]]
name = "fxy"
packs = ["x", "y"]
"""


# a domain without a pack, its held-out prompts a file of their own
DOMAIN = 'domains = { both = "both.txt" }\nheldout = { both = "both.heldout.txt" }'


def write(root: Path, extra: str = DOMAIN) -> Path:
    recipe = root / "graftbuild.toml"
    recipe.write_text(RECIPE.replace("EXTRA", extra))
    return recipe


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("options")
    cfg = dict(TINY_LLAMA) | {"architectures": ["LlamaForCausalLM"]}
    (root / "config.json").write_text(json.dumps(cfg))
    shutil.copyfile(DATA / "general.train.txt", root / "general.txt")
    # "both": an arithmetic line then a code line; fitted on some, chosen on others
    a, c = (DATA / "arith.train.txt").read_text(), (DATA / "code.train.txt").read_text()
    both = [f"{x} ; {y}" for x, y in zip(a.splitlines(), c.splitlines(), strict=True)]
    (root / "both.txt").write_text("\n".join(both[:200]) + "\n")
    (root / "both.heldout.txt").write_text("\n".join(both[1000:1100]) + "\n")
    recipe = write(root)
    res = make(recipe)
    return {"root": root, "recipe": recipe, "result": res}


def _bundle(built: dict, name: str = "bundle") -> dict:
    return json.loads((built["result"].node(f"fuse:{name}").output / "bundle.json").read_text())


def _loss(model: object, tok: object, texts: list[str]) -> float:
    """Mean next-token loss over the texts' tokens, one text at a time (no padding): a check
    independent of the build's batched measurement."""
    total, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t)["input_ids"][:128]])  # type: ignore[operator]
            if ids.shape[1] < 2:
                continue
            logits = model(input_ids=ids).logits[0, :-1]  # type: ignore[operator]
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return total / count


def test_each_domain_gets_the_option_with_the_lowest_heldout_loss(built: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = built["result"]
    router = _bundle(built)["router"]
    assert router["select"] == "loss"
    assert router["options"] == [[], ["x"], ["y"], ["x", "y"]]
    assert router["classes"] == ["x", "y", "both", ""]
    # the build measured every option on every domain: check it against the fused models
    folders = {
        "base": res.node("base").output,
        "x": res.node("fuse:fx").output,
        "y": res.node("fuse:fy").output,
        "x+y": res.node("fuse:fxy").output,
    }
    files = {"x": DATA / "arith.train.txt", "y": DATA / "code.train.txt"}
    files["base"] = built["root"] / "general.txt"
    tok = AutoTokenizer.from_pretrained(str(folders["base"]))
    heldout = {d: f.read_text().splitlines()[-CHOOSE:] for d, f in files.items()}
    heldout["both"] = (built["root"] / "both.heldout.txt").read_text().splitlines()[:CHOOSE]
    want: dict[str, dict[str, float]] = {d: {} for d in heldout}
    for option, folder in folders.items():
        model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        for d, texts in heldout.items():
            want[d][option] = _loss(model, tok, texts)
    for d in heldout:
        for option, loss in want[d].items():
            assert math.isclose(router["losses"][d][option], loss, rel_tol=2e-3), (d, option)
    labels = ["base", "x", "y", "x+y"]
    chosen = {("base" if c == "" else c): labels[i] for c, i in router["choice"].items()}
    assert chosen == {d: min(want[d], key=want[d].__getitem__) for d in want}
    # the known answer: none, a pack and the mix each win a domain, by a clear margin
    assert {d: chosen[d] for d in ("base", "x", "y")} == {"base": "base", "y": "y", "x": "x+y"}
    assert want["x"]["x+y"] < 0.97 * want["x"]["x"]
    assert router["measured_on"] == {"x": CHOOSE, "y": CHOOSE, "both": CHOOSE, "base": CHOOSE}


def test_decisions_report_the_option_and_its_confidence(built: dict) -> None:
    g = GraftedModel.from_pretrained(built["result"].node("fuse:bundle").output)
    g.activate("y")  # routing runs on the base whatever is active
    expect = {"arith": ["x", "y"], "code": ["y"], "general": []}
    correct = total = 0
    for d, packs in expect.items():
        prompts = (DATA / f"{d}.heldout.txt").read_text().splitlines()[:40]
        decisions = g.decide(prompts)
        for dec in decisions:
            assert set(dec.options) == {"base", "x", "y", "x+y"}
            assert abs(sum(dec.options.values()) - 1.0) < 1e-9
            assert abs(sum(dec.domains.values()) - 1.0) < 1e-9
            assert set(dec.domains) == {"x", "y", "both", "base"}
            assert dec.confidence == max(dec.options.values()) == dec.options[dec.option]
            assert dec.packs == ([] if dec.option == "base" else dec.option.split("+"))
            # an option's probability is the sum of its domains' (x alone serves none)
            assert dec.options["x"] == 0.0
            assert math.isclose(dec.options["x+y"], dec.domains["x"], rel_tol=1e-9)
        correct += sum(dec.packs == packs for dec in decisions)
        total += len(decisions)
        routes, scores = g.route(prompts, return_scores=True)
        assert routes == [dec.packs for dec in decisions]
        assert scores == [dec.options for dec in decisions]
    assert g.active == ["y"]
    assert correct / total >= 0.9, correct / total
    lines: list[str] = []
    g.activate([])
    g.generate(["12 + 7 ="], max_new_tokens=2, log_routes=lines.append)
    assert re.match(r"route 0: '12 \+ 7 =' -> \['x', 'y'\] \(x\+y [01]\.\d\d; x\+y ", lines[0])


def test_a_recipe_without_a_general_domain_still_builds(built: dict) -> None:
    doc = _bundle(built, "old")
    router = doc["router"]
    assert doc["version"] == 2
    assert router["classes"] == ["x", "y"]
    assert set(router["losses"]) == {"x", "y"}  # fitted and chosen on the finetune data
    labels = ["base", "x", "y", "x+y"]
    for c, i in router["choice"].items():
        assert labels[i] == min(router["losses"][c], key=router["losses"][c].__getitem__)
    g = GraftedModel.from_pretrained(built["result"].node("fuse:old").output)
    (dec,) = g.decide(["def add_1(n):"])
    assert dec.packs == ["y"] and set(dec.domains) == {"x", "y"}


def test_version_1_bundles_still_load(built: dict, tmp_path: Path) -> None:
    folder = tmp_path / "v1"
    shutil.copytree(built["result"].node("fuse:old").output, folder)
    doc = json.loads((folder / "bundle.json").read_text())
    doc["version"] = 1
    doc["router"] = {k: doc["router"][k] for k in ("kind", "classes", "seq_len")}
    (folder / "bundle.json").write_text(json.dumps(doc))
    g = GraftedModel.from_pretrained(folder)
    routes, scores = g.route(["12 + 7 = 19", "def add_1(n):"], return_scores=True)
    assert routes == [["x"], ["y"]]  # each class its own option, as version 1 routed
    assert set(scores[0]) == {"x", "y"}


def test_general_prompts_and_options_are_in_the_key(built: dict) -> None:
    root, recipe = built["root"], built["recipe"]

    def stale() -> list[str]:
        r = load_recipe(recipe)
        return [n.id for n in Engine(r, Store(cache_dir(r))).plan() if n.state == "stale"]

    assert stale() == []
    general = root / "general.txt"
    before = general.read_text()
    try:
        general.write_text(before + "A new line of plain English for the router.\n")
        assert stale() == ["fuse:bundle"]
    finally:
        general.write_text(before)
    held = root / "general.heldout.txt"
    held.write_text((DATA / "general.heldout.txt").read_text())
    both = root / "both.heldout.txt"
    before = both.read_text()
    try:
        both.write_text(before + "1 + 1 = 2 ; x = 1\n")
        assert stale() == ["fuse:bundle"]
    finally:
        both.write_text(before)
    for extra in (
        DOMAIN.replace('heldout.txt" }', f'heldout.txt", base = "{held}" }}'),
        'domains = { both = "both.txt", chat = "general.txt" }',
        f"{DOMAIN}\nmixes = []",
        f'{DOMAIN}\nselect = "domain"',
        f"{DOMAIN}\nloss_len = 32",
    ):
        write(root, extra)
        assert stale() == ["fuse:bundle"], extra
    write(root)
    assert stale() == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('mixes = [["x", "q"]]', r"options.mixes: \['x', 'q'\] names packs not in `packs`"),
        ('mixes = [["x"]]', "a mix needs two packs or more"),
        ('domains = { x = "general.txt" }', "a domain's name must not be a pack's"),
        ('heldout = { chat = "general.txt" }', r"heldout names domains .*: \['chat'\]"),
        ('mix_strategy = "nope"', r"mix_strategy: unknown fusion strategy 'nope'"),
        ('mix_strategy = "ties"\nmix_options = { density = 2 }', r"mix_options: .*density"),
    ],
)
def test_option_errors_name_the_option(
    built: dict, tmp_path: Path, extra: str, message: str
) -> None:
    recipe = tmp_path / "graftbuild.toml"
    shutil.copyfile(built["root"] / "config.json", tmp_path / "config.json")
    shutil.copyfile(built["root"] / "general.txt", tmp_path / "general.txt")
    recipe.write_text(RECIPE.replace("EXTRA", extra))
    with pytest.raises(UserError, match=message):
        Engine(load_recipe(recipe), Store(tmp_path / "c"))


def test_pack_names_that_would_read_as_options_are_refused(built: dict, tmp_path: Path) -> None:
    recipe = tmp_path / "graftbuild.toml"
    shutil.copyfile(built["root"] / "config.json", tmp_path / "config.json")
    text = (
        RECIPE.replace("EXTRA", "")
        .replace('"y"', '"a+b"')
        .replace("[sources.y]", '[sources."a+b"]')
    )
    recipe.write_text(text)
    with pytest.raises(UserError, match=r"must not be named 'base' or hold '\+': \['a\+b'\]"):
        Engine(load_recipe(recipe), Store(tmp_path / "c"))


def test_a_ties_mix_is_stored_and_switched_in_as_the_ties_fuse(built: dict) -> None:
    from transformers import AutoModelForCausalLM

    res = built["result"]
    folder = res.node("fuse:tiesmix").output
    doc = json.loads((folder / "bundle.json").read_text())
    assert doc["mixes"] == [
        {"name": "x+y", "file": "mixes/x+y.safetensors", "packs": ["x", "y"], "strategy": "ties"}
    ]
    assert doc["router"]["options"] == [[], ["x"], ["y"], ["x+y"]]
    g = GraftedModel.from_pretrained(folder)
    ids = torch.arange(1, 40).unsqueeze(0)
    want = AutoModelForCausalLM.from_pretrained(str(res.node("fuse:ties").output)).eval()
    with torch.no_grad(), g.using(["x+y"]):
        torch.testing.assert_close(g(input_ids=ids).logits, want(input_ids=ids).logits)
    with torch.no_grad(), g.using([]):
        base = AutoModelForCausalLM.from_pretrained(str(res.node("base").output)).eval()
        torch.testing.assert_close(g(input_ids=ids).logits, base(input_ids=ids).logits)
    g.close()
    with pytest.raises(UserError, match="export bundle supports mixes of mix_strategy"):
        from graftbuild.release.serving import export_bundle

        export_bundle(folder, built["root"] / "exported")
