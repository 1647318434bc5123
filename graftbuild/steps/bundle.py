"""``fuse`` with ``strategy = "routed"``: a bundle folder, the base model, the packs and a router
(layout: graftbuild/runtime/bundle.py; ``graftbuild.runtime.GraftedModel`` loads it).

The router is fitted here, on the base model, from each domain's prompts (declared files of this
node, so they are in its key): each pack's domain (the source's finetune data unless
``options.prompts`` names other files), the base's own domain (``options.base_prompts``) and any
extra ``options.domains``. Then, with ``select = "loss"`` (the default), every option (no pack,
each pack, each mix of ``options.mixes``) is switched in on the base and its loss measured on
each domain's held-out prompts (``options.heldout``, or the tail of the domain's file held back
from fitting); each domain is served by the option with the lowest loss.
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

BASE_DOMAIN = "base"
"""The base's own domain as recipes name it (``options.heldout.base``)."""
FILE_KEYS = ("prompts", "base_prompts", "domains", "heldout")
"""Options naming files: the files are inputs of the node, their paths are not in its config."""


def bundle_node(recipe: Recipe, f: FuseSpec, out: Path) -> Node:
    """The node of a routed fuse: deps as a plain fuse, plus the router's prompt files."""
    opts = f.options
    where = f"{recipe.path}: fuse {f.name!r}: options"
    unknown = sorted(set(opts["prompts"]) - set(f.packs))
    if unknown:
        raise UserError(f"{where}.prompts names packs not in `packs`: {unknown}")
    odd = sorted(p for p in f.packs if p == BASE_DOMAIN or "+" in p)
    if odd:  # the router's labels: "base" is no pack, "x+y" a mix
        raise UserError(
            f"{recipe.path}: fuse {f.name!r}: a routed bundle's packs must not be named 'base' "
            f"or hold '+': {odd}"
        )
    clash = sorted(d for d in opts["domains"] if d in f.packs or d == BASE_DOMAIN or "+" in d)
    if clash:
        raise UserError(
            f"{where}.domains: {clash}: a domain's name must not be a pack's, 'base' or hold '+'"
        )
    files: dict[str, Path] = {}
    for i, p in enumerate(f.packs):
        if p in opts["prompts"]:
            files[f"prompts.{i}"] = (recipe.root / opts["prompts"][p]).resolve()
        elif recipe.sources[p].finetune is not None:
            files[f"prompts.{i}"] = recipe.sources[p].finetune.data  # type: ignore[union-attr]
        else:
            raise UserError(
                f"{where}.prompts: pack {p!r} has no prompts for the router; add {p} = FILE"
            )
    if opts["base_prompts"] is not None:
        files["prompts.base"] = (recipe.root / opts["base_prompts"]).resolve()
    for d, path in sorted(opts["domains"].items()):
        files[f"prompts.domain.{d}"] = (recipe.root / path).resolve()
    domains = list(f.packs) + sorted(opts["domains"])
    if opts["base_prompts"] is not None:
        domains.append(BASE_DOMAIN)
    unknown = sorted(set(opts["heldout"]) - set(domains))
    if unknown:
        raise UserError(f"{where}.heldout names domains the router has no prompts for: {unknown}")
    for d, path in opts["heldout"].items():
        key = (
            f"heldout.{f.packs.index(d)}"
            if d in f.packs
            else ("heldout.base" if d == BASE_DOMAIN else f"heldout.domain.{d}")
        )
        files[key] = (recipe.root / path).resolve()
    mixes = _mixes(opts["mixes"], f.packs, where)
    components = strategy_components("routed")
    if opts["mix_strategy"] != "sum" and mixes:
        components |= _mix_strategy(recipe, f, mixes, where)
    options = {k: v for k, v in opts.items() if k not in FILE_KEYS} | {
        "mixes": mixes,
        "domains": sorted(opts["domains"]),
    }
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
        | {f"file:heldout.{i}": f"held-out prompts of '{p}' changed" for i, p in enumerate(f.packs)}
        | {"file:prompts.base": "router base prompts changed"}
        | {"file:heldout.base": "held-out base prompts changed"}
        | {
            f"file:prompts.domain.{d}": f"router prompts of domain '{d}' changed"
            for d in opts["domains"]
        }
        | {
            f"file:heldout.domain.{d}": f"held-out prompts of domain '{d}' changed"
            for d in opts["domains"]
        },
        output=f.output or out / "fused" / f.name,
        components=components,
    )


def _mix_strategy(recipe: Recipe, f: FuseSpec, mixes: list[list[str]], where: str) -> dict:
    """The mix strategy's component version, its options checked (a plan-time user error)."""
    from pydantic import ValidationError

    from graftbuild.fusion import get_strategy

    name = f.options["mix_strategy"]
    try:
        strategy = get_strategy(name)
    except ValueError as e:
        raise UserError(f"{where}.mix_strategy: {e}") from None
    if getattr(strategy, "bundle", False):
        raise UserError(f"{where}.mix_strategy: {name!r} is not a static fusion")
    try:
        strategy.Params.model_validate(f.options["mix_options"])
    except ValidationError as e:
        first = e.errors()[0]
        loc = "".join(f".{x}" for x in first["loc"])
        raise UserError(f"{where}.mix_options{loc}: {first['msg']}") from None
    chained = sorted(p for m in mixes for p in m if recipe.sources[p].parent is not None)
    if chained:
        raise UserError(
            f"{where}.mix_strategy: {name!r} mixes of chained packs are not supported "
            f'({chained}); use mix_strategy = "sum"'
        )
    return strategy_components(name)


def _mixes(given: list[list[str]] | None, packs: list[str], where: str) -> list[list[str]]:
    """The mixes, each in fusion order, checked: default one mix of all packs (two or more)."""
    if given is None:
        return [list(packs)] if len(packs) >= 2 else []
    out: list[list[str]] = []
    for mix in given:
        bad = sorted(set(mix) - set(packs))
        if bad:
            raise UserError(f"{where}.mixes: {mix} names packs not in `packs`: {bad}")
        ordered = [p for p in packs if p in mix]
        if len(ordered) < 2:
            raise UserError(f"{where}.mixes: {mix}: a mix needs two packs or more")
        if ordered not in out:
            out.append(ordered)
    return out


def split_prompts(
    lines: list[str], heldout: list[str] | None, samples: int, choose: int, select: str
) -> tuple[list[str], list[str]]:
    """(prompts the classifier is fitted on, prompts the options' losses are measured on).

    Without a held-out file the last ``choose`` prompts (at most a quarter of the file) are held
    back from fitting; a file too small to split serves both (and ``select = "domain"`` measures
    nothing, so fits on the first ``samples`` as it always did)."""
    if select == "domain":
        return lines[:samples], []
    if heldout is not None:
        return lines[:samples], heldout[:choose]
    k = min(choose, len(lines) // 4)
    if k == 0:
        return lines[:samples], lines[:choose]
    return lines[:-k][:samples], lines[-k:]


class BundleStep:
    name: ClassVar[str] = "bundle"
    version: ClassVar[int] = 2
    uses_accelerator: ClassVar[bool] = True

    def nodes(self, recipe: Recipe, out: Path) -> list[Node]:
        return [bundle_node(recipe, f, out) for f in recipe.fuse if f.strategy == "routed"]

    def run(self, ctx: StepContext) -> None:
        from graftbuild.runtime.bundle import write_bundle
        from graftbuild.runtime.router import BASE, Router, is_causal
        from graftbuild.skillpack import PackReader, write_stored
        from graftbuild.weights.modeling import load_model, load_tokenizer, set_threads
        from graftbuild.weights.tensors import copy_non_weight_files, weight_files
        from graftbuild.weights.textdata import read_examples, read_retrieval

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

        classes = list(cfg["packs"]) + list(opts["domains"])
        files = [f"prompts.{i}" for i in range(len(cfg["packs"]))]
        held = [f"heldout.{i}" for i in range(len(cfg["packs"]))]
        files += [f"prompts.domain.{d}" for d in opts["domains"]]
        held += [f"heldout.domain.{d}" for d in opts["domains"]]
        if cfg["base_class"]:
            classes.append(BASE)
            files.append("prompts.base")
            held.append("heldout.base")
        stored: list[dict[str, Any]] = []
        if opts["mix_strategy"] != "sum" and opts["mixes"]:
            (ctx.out / "mixes").mkdir()
            for mix in opts["mixes"]:
                stored.append(_write_mix(ctx, mix, packs))
        tok = load_tokenizer(base_in, need_eos=False)  # the router reads hidden states only
        model = load_model(base_in, ctx.placement).eval()
        options = [[]] + [[p] for p in cfg["packs"]]
        # a stored mix is switched in as one entry, named by its label
        options += [[m["name"]] for m in stored] or [list(m) for m in opts["mixes"]]
        causal = is_causal(model)
        fit: dict[str, list[str]] = {}
        choose: dict[str, list[str] | list[tuple[str, str]]] = {}
        for c, key, hkey in zip(classes, files, held, strict=True):
            lines = read_examples(ctx.files[key], opts["field"])
            pairs = read_retrieval(ctx.files[hkey]) if hkey in ctx.files else None
            if pairs is not None:  # {query, doc} rows: the option that retrieves best
                fit[c], choose[c] = lines[: opts["samples"]], pairs[: opts["choose_samples"]]
                continue
            heldout = read_examples(ctx.files[hkey], opts["field"]) if hkey in ctx.files else None
            mode = "loss" if causal and opts["select"] == "loss" else "domain"
            fit[c], texts = split_prompts(
                lines, heldout, opts["samples"], opts["choose_samples"], mode
            )
            if texts:
                choose[c] = texts
        if opts["select"] != "loss":
            choose = {}
        with ctx.progress.task(f"router {ctx.node_id}", 1 + bool(choose)) as advance:
            router = Router.fit(model, tok, fit, opts["seq_len"])
            advance(1)
            own = {c: (options.index([c]) if c in cfg["packs"] else 0) for c in router.classes}
            if choose:
                router = self._choose(ctx, model, tok, router, packs, stored, options, choose, own)
                advance(1)
            else:
                why = "encoder: no next-token loss" if opts["select"] == "loss" else "recipe"
                router = router.with_choice(options, own, {"select": f"domain ({why})"})
        write_bundle(ctx.out, packs, router.save(ctx.out), stored)

    @staticmethod
    def _choose(
        ctx: StepContext,
        model: Any,
        tok: Any,
        router: Any,
        packs: list[dict[str, Any]],
        stored: list[dict[str, Any]],
        options: list[list[str]],
        heldout: dict[str, Any],
        own: dict[str, int],
    ) -> Any:
        """The router answering, for each domain with held-out data, the option that does best
        on it, every option switched in on the base in place (as ``GraftedModel`` serves): the
        lowest next-token loss on held-out prompts, or for {query, doc} rows the highest MRR
        (``1 - mrr`` is recorded, lower is better). Other domains keep ``own``."""
        from graftbuild.runtime.bundle import StoredDelta
        from graftbuild.runtime.grafted import GraftedModel, text_loss
        from graftbuild.runtime.router import best_option, domain_label, option_label
        from graftbuild.skillpack import PackReader
        from graftbuild.steps.evaluate import retrieval_scores

        opts = ctx.config["options"]
        readers: dict[str, Any] = {p["name"]: PackReader(ctx.out / p["file"]) for p in packs}
        readers |= {m["name"]: StoredDelta(ctx.out / m["file"]) for m in stored}
        weights = {p["name"]: float(p["weight"]) for p in packs} | {m["name"]: 1.0 for m in stored}
        parents = {p["name"]: p["parent"] for p in packs} | {m["name"]: None for m in stored}
        metrics = {
            domain_label(c): ("1 - mrr" if isinstance(rows[0], tuple) else "loss")
            for c, rows in heldout.items()
        }
        losses: dict[str, dict[str, float]] = {d: {} for d in metrics}
        try:
            g = GraftedModel(
                ctx.out,
                model,
                tok,
                readers,
                weights,
                parents,
                None,
            )
            for option in options:
                g.activate(option)
                for c, rows in heldout.items():
                    d = domain_label(c)
                    if metrics[d] == "loss":
                        try:
                            value = text_loss(model, tok, rows, opts["loss_len"])
                        except UserError as e:
                            raise UserError(f"{ctx.node_id}: domain '{d}': {e}") from None
                    else:
                        scores = retrieval_scores(
                            model, tok, rows, opts["loss_len"], 16, ctx.placement
                        )
                        value = 1.0 - scores["mrr"]
                    losses[d][option_label(option)] = value
            g.activate([])
        finally:
            for r in readers.values():
                r.close()
        labels = [option_label(o) for o in options]
        choice = dict(own)
        for c in heldout:
            choice[c] = labels.index(best_option(losses[domain_label(c)]))
        info = {
            "select": "loss",
            "losses": losses,
            "metrics": metrics,
            "measured_on": {domain_label(c): len(rows) for c, rows in heldout.items()},
        }
        return router.with_choice(options, choice, info)


def _write_mix(ctx: StepContext, mix: list[str], packs: list[dict[str, Any]]) -> dict[str, Any]:
    """``mixes/LABEL.safetensors``: the mix's fused delta (the mix strategy over its packs'
    decoded deltas, minus the base), float32, one tensor at a time."""
    import json

    import torch

    from graftbuild.fusion import get_strategy
    from graftbuild.runtime.router import option_label
    from graftbuild.skillpack import PackReader
    from graftbuild.weights.tensors import ModelWeights, SafetensorsStreamWriter, TensorInfo

    opts = ctx.config["options"]
    strategy = get_strategy(opts["mix_strategy"])
    params: Any = strategy.Params.model_validate(opts["mix_options"])
    by_name = {p["name"]: p for p in packs}
    weights = [float(by_name[m]["weight"]) for m in mix]
    bind = getattr(strategy, "bind", None)  # mergekit-named strategies: per-pack settings
    if bind is not None:
        base_cfg = json.loads((ctx.inputs["base"] / "config.json").read_text())
        params = bind(params, [{}] * len(mix), base_cfg, weights)
    label = option_label(mix)
    rel = f"mixes/{label}.safetensors"
    readers = [PackReader(ctx.out / by_name[m]["file"]) for m in mix]
    try:
        touched = [set(r.names()) for r in readers]
        names = sorted(set().union(*touched))
        with ModelWeights(ctx.inputs["base"]) as base:
            infos = [TensorInfo(n, base.infos[n].shape, "F32", ctx.out / rel) for n in names]
            writer = SafetensorsStreamWriter(ctx.out / rel, infos, {"format": "pt"})
            with torch.no_grad():
                for n in names:
                    b = base.get(n).float()
                    deltas = [
                        r.decode(n, "cpu") if n in t else None
                        for r, t in zip(readers, touched, strict=True)
                    ]
                    fused = strategy.combine(b, deltas, weights, params, n)
                    writer.write(n, (fused - b).contiguous())
            writer.close()
    finally:
        for r in readers:
            r.close()
    return {"name": label, "file": rel, "packs": mix, "strategy": opts["mix_strategy"]}
