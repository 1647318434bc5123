"""``fuse`` with ``strategy = "routed"``: a bundle folder, the base model, the packs and a router
(layout: graftbuild/runtime/bundle.py; ``graftbuild.runtime.GraftedModel`` loads it).

The router is fitted here, on the base model, from each pack's prompts (declared files of this
node, so they are in its key): the source's finetune data unless ``options.prompts`` names other
files, plus ``options.base_prompts`` for inputs that should go to no pack.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from graftbuild.errors import BuildError, UserError
from graftbuild.recipe import ids
from graftbuild.skillpack.format import PACK_FILE
from graftbuild.steps.base import Node, StepContext
from graftbuild.steps.fuse import strategy_components

if TYPE_CHECKING:
    from graftbuild.recipe import FuseSpec, Recipe


def bundle_node(recipe: Recipe, f: FuseSpec, out: Path) -> Node:
    """The node of a routed fuse: deps as a plain fuse, plus the router's prompts."""
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
        ids.fuse(f.name),
        "bundle",
        config={
            "packs": f.packs,
            "weights": f.weight_list(),
            "parents": {p: recipe.sources[p].parent for p in f.packs},
            "options": options,
            "base_class": opts["base_prompts"] is not None,
        },
        deps={"base": ids.BASE} | {f"pack.{i}": ids.pack(p) for i, p in enumerate(f.packs)},
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
        components=strategy_components("routed"),
    )


class BundleStep:
    name: ClassVar[str] = "bundle"
    version: ClassVar[int] = 1
    uses_accelerator: ClassVar[bool] = True

    def nodes(self, recipe: Recipe, out: Path) -> list[Node]:
        return [bundle_node(recipe, f, out) for f in recipe.fuse if f.strategy == "routed"]

    def run(self, ctx: StepContext) -> None:
        from graftbuild.runtime.bundle import write_bundle
        from graftbuild.runtime.router import BASE, Router
        from graftbuild.skillpack import PackReader, write_stored
        from graftbuild.weights.modeling import load_model, load_tokenizer, set_threads
        from graftbuild.weights.tensors import copy_non_weight_files, weight_files
        from graftbuild.weights.textdata import read_examples

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
            dest = ctx.out / "packs" / f"{name}.safetensors"
            with PackReader(src, base_in, ctx.inputs.get(f"pack.{i}.source")) as reader:
                if reader.header.get("base") != ctx.input_hashes["base"]:
                    raise BuildError(f"{ctx.node_id}: {name} was packed against another base model")
                added = (reader.header.get("vocab") or {}).get("tokens") or []
                if added:
                    # the bundle switches packs in place on the base's tensors, whose shapes
                    # a pack cannot change
                    raise UserError(
                        f"{ctx.node_id}: pack '{name}' adds tokens "
                        f"({', '.join(repr(t['content']) for t in added[:5])}); a routed bundle "
                        "keeps the base's vocabulary: fuse it with sum, ties or dare instead"
                    )
                if reader.is_reference:  # a bundle stands alone: the stored pack's bytes
                    write_stored(reader, dest)
            if not dest.exists():
                shutil.copyfile(src, dest)
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
        tok = load_tokenizer(base_in, need_eos=False)  # the router reads hidden states only
        model = load_model(base_in, ctx.placement).eval()
        with ctx.progress.task(f"router {ctx.node_id}", 1) as advance:
            router = Router.fit(model, tok, prompts, opts["seq_len"])
            advance(1)
        write_bundle(ctx.out, packs, router.save(ctx.out))
