"""``fuse`` with ``strategy = "routed"``: a bundle folder, the base model, the packs and a router.

Layout (``bundle.json`` describes it; ``graftbuild.runtime.GraftedModel`` loads it)::

    bundle.json            {"format": "graftbuild.bundle", "version": 1, "packs": [...], "router"}
    base/                  the base model folder (config, tokenizer, safetensors weights)
    packs/NAME.safetensors each pack's SkillPack file, unchanged
    router.safetensors     the router's centroids (graftbuild/router.py)

The router is fitted here, on the base model, from each pack's prompts (declared files of this
node, so they are in its key): the source's finetune data unless ``options.prompts`` names other
files, plus ``options.base_prompts`` for inputs that should go to no pack.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from graftbuild.errors import BuildError, UserError
from graftbuild.steps.base import StepContext
from graftbuild.steps.pack import PACK_FILE

if TYPE_CHECKING:
    from graftbuild.graph import Node
    from graftbuild.recipe import FuseSpec, Recipe

BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT = "graftbuild.bundle"


def bundle_node(recipe: Recipe, f: FuseSpec, out: Path) -> Node:
    """The planner's node for a routed fuse: deps as a plain fuse, plus the router's prompts."""
    from graftbuild.graph import Node

    opts = f.options
    where = f"{recipe.path}: fuse {f.name!r}: options.prompts"
    unknown = sorted(set(opts["prompts"]) - set(f.packs))
    if unknown:
        raise UserError(f"{where} names packs not in `packs`: {unknown}")
    files: dict[str, Path] = {}
    for i, p in enumerate(f.packs):
        if p in opts["prompts"]:
            files[f"prompts.{i}"] = (recipe.root / opts["prompts"][p]).resolve()
        elif recipe.sources[p].finetune is not None:
            files[f"prompts.{i}"] = recipe.sources[p].finetune.data  # type: ignore[union-attr]
        else:
            raise UserError(f"{where}: pack {p!r} has no prompts for the router; add {p} = FILE")
    if opts["base_prompts"] is not None:
        files["prompts.base"] = (recipe.root / opts["base_prompts"]).resolve()
    options = {k: v for k, v in opts.items() if k not in ("prompts", "base_prompts")}
    return Node(
        f"fuse:{f.name}",
        "bundle",
        config={
            "packs": f.packs,
            "weights": f.weight_list(),
            "parents": {p: recipe.sources[p].parent for p in f.packs},
            "options": options,
            "base_class": opts["base_prompts"] is not None,
        },
        deps={"base": "base"} | {f"pack.{i}": f"pack:{p}" for i, p in enumerate(f.packs)},
        files=files,
        labels={
            "config.packs": "fusion order changed",
            "config.weights": "fusion weights changed",
            "config.options": "router options changed",
            "config.base_class": "base prompts added or removed",
            "dep:base": "base model changed",
        }
        | {f"dep:pack.{i}": f"pack '{p}' changed" for i, p in enumerate(f.packs)}
        | {f"file:prompts.{i}": f"router prompts of '{p}' changed" for i, p in enumerate(f.packs)}
        | {"file:prompts.base": "router base prompts changed"},
        output=f.output or out / "fused" / f.name,
    )


class BundleStep:
    name: ClassVar[str] = "bundle"
    version: ClassVar[int] = 1

    def run(self, ctx: StepContext) -> None:
        from graftbuild.modeling import load_causal_lm, load_tokenizer, set_threads
        from graftbuild.router import BASE, Router
        from graftbuild.skillpack import PackReader
        from graftbuild.tensors import copy_non_weight_files, weight_files
        from graftbuild.textdata import read_examples

        set_threads(ctx.settings.threads)
        cfg = ctx.config
        opts = cfg["options"]
        base_in = ctx.inputs["base"]
        (ctx.out / "base").mkdir()
        copy_non_weight_files(base_in, ctx.out / "base")
        for w in weight_files(base_in):
            shutil.copyfile(w, ctx.out / "base" / w.name)
        index = base_in / "model.safetensors.index.json"
        if index.is_file():
            shutil.copyfile(index, ctx.out / "base" / index.name)
        (ctx.out / "packs").mkdir()
        packs: list[dict[str, Any]] = []
        for i, (name, weight) in enumerate(zip(cfg["packs"], cfg["weights"], strict=True)):
            src = ctx.inputs[f"pack.{i}"] / PACK_FILE
            with PackReader(src) as reader:
                if reader.header.get("base") != ctx.input_hashes["base"]:
                    raise BuildError(f"{ctx.node_id}: {name} was packed against another base model")
            shutil.copyfile(src, ctx.out / "packs" / f"{name}.safetensors")
            packs.append(
                {
                    "name": name,
                    "file": f"packs/{name}.safetensors",
                    "weight": weight,
                    "parent": cfg["parents"].get(name),
                }
            )

        prompts: dict[str, list[str]] = {}
        for i, name in enumerate(cfg["packs"]):
            prompts[name] = read_examples(ctx.files[f"prompts.{i}"], opts["field"])
        if cfg["base_class"]:
            prompts[BASE] = read_examples(ctx.files["prompts.base"], opts["field"])
        prompts = {c: texts[: opts["samples"]] for c, texts in prompts.items()}
        tok = load_tokenizer(base_in)
        model = load_causal_lm(base_in, ctx.settings.device).eval()
        with ctx.progress.task(f"router {ctx.node_id}", 1) as advance:
            router = Router.fit(model, tok, prompts, opts["seq_len"])
            advance(1)
        doc = {
            "format": BUNDLE_FORMAT,
            "version": 1,
            "base": "base",
            "packs": packs,
            "router": router.save(ctx.out),
        }
        (ctx.out / BUNDLE_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
