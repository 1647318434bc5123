"""``release``: a fused model folder plus its model card (README.md) and a file manifest.

Refuses (BuildError, exit 1) when a gate of one of its evals fails, so a regressed model is never
written as a release. The weights are hard links to the fused object's files (copies across
filesystems): a release costs a card and a manifest, not another model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import xxhash

from graftbuild.cache.hashing import CHUNK, iter_files
from graftbuild.errors import BuildError
from graftbuild.recipe import ids
from graftbuild.steps.base import Node, StepContext

if TYPE_CHECKING:
    from graftbuild.recipe import Recipe, ReleaseSpec

MANIFEST_FILE = "graftbuild-manifest.json"
CARD_FILE = "README.md"
DEFAULT_TAGS = ["graftbuild", "graftllm", "merge"]
BASE_DESC = {
    "input": "a model folder",
    "init": "seeded random init",
    "sft": "seeded random init, then trained in the build",
}


class ReleaseStep:
    name: ClassVar[str] = "release"
    version: ClassVar[int] = 2  # 2: the card links the build report
    uses_accelerator: ClassVar[bool] = False

    def nodes(self, recipe: Recipe, out: Path) -> list[Node]:
        return [release_node(recipe, r, out) for r in recipe.release]

    def run(self, ctx: StepContext) -> None:
        from graftbuild.release.card import read_front_matter, render

        cfg = ctx.config
        evals = self._evals(ctx)
        failed = [g for ev in evals for g in ev["gates"] if not g.passed]
        if failed:
            raise BuildError(
                f"{ctx.node_id}: refused, {len(failed)} release gate(s) failed: "
                + "; ".join(g.describe() for g in failed)
            )
        for rel, p in iter_files(ctx.inputs["model"]):
            _link_or_copy(p, ctx.out / rel)

        base_card: dict[str, Any] = {}
        if "base_card" in ctx.files:
            base_card = read_front_matter(ctx.files["base_card"].read_text(errors="replace"))
        card = cfg["card"]
        license_ = card["license"] or _str(base_card.get("license"))
        base_model = card["base_model"] or _hub_id(ctx.inputs["base"])
        tags = list(dict.fromkeys([*DEFAULT_TAGS, *card["tags"]]))
        fuse = cfg["fuse"]
        packs = [
            _pack_info(ctx.inputs[f"pack.{i}"], ctx.input_hashes[f"pack.{i}"])
            | {"name": p, "weight": fuse["weights"][i], "profile": cfg["compression"][p]}
            for i, p in enumerate(fuse["packs"])
        ]
        from graftbuild.weights.modeling import auto_class, read_config

        model_dir = ctx.inputs["model"]
        text = render(
            {
                "auto_class": auto_class(read_config(model_dir)),
                "sentence_transformers": (model_dir / "modules.json").is_file(),
                "project": cfg["project"]["name"],
                "version": cfg["project"]["version"],
                "release": ctx.node_id.split(":", 1)[1],
                "base_model": base_model,
                "license": license_,
                "tags": tags,
                "base_desc": BASE_DESC.get(cfg["base"], cfg["base"]),
                "base_hash": ctx.input_hashes["base"],
                "model_hash": ctx.input_hashes["model"],
                "fuse": fuse,
                "packs": packs,
                "evals": evals,
            }
        )
        (ctx.out / CARD_FILE).write_text(text)
        write_manifest(ctx.out)

    @staticmethod
    def _evals(ctx: StepContext) -> list[dict[str, Any]]:
        from graftbuild.release.gates import METRICS_FILE, check

        out = []
        for j, ev in enumerate(ctx.config["evals"]):
            metrics = json.loads((ctx.inputs[f"eval.{j}"] / METRICS_FILE).read_text())
            gates = check(ev["name"], ev["gates"], ev["reference"], metrics)
            out.append(
                {"name": ev["name"], "models": ev["models"], "metrics": metrics, "gates": gates}
            )
        return out


def _str(v: Any) -> str | None:
    return str(v) if v else None


def _hub_id(base: Path) -> str | None:
    """The base config's ``_name_or_path`` when it looks like a hub id, not a local path."""
    try:
        name = json.loads((base / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(name, str) or not name or name.startswith((".", "/", "~")):
        return None
    return name


def _pack_info(folder: Path, digest: str) -> dict[str, Any]:
    """Size, fp16-delta size and codecs by role of a pack, from its header alone (no torch)."""
    from graftbuild.release.card import codec_label
    from graftbuild.skillpack import METADATA_KEY
    from graftbuild.skillpack.format import PACK_FILE
    from graftbuild.weights.tensors import read_header

    path = folder / PACK_FILE
    doc = json.loads(read_header(path)["__metadata__"][METADATA_KEY])
    codecs: dict[str, tuple[str, int]] = {}
    delta = 0
    for _, entry in sorted(doc["tensors"].items()):
        delta += 2 * math.prod(entry["shape"])
        if entry["codec"] == "zero":
            continue  # a tensor the fine-tune left as it was: no codec to show
        label = codec_label(entry["codec"], entry["params"])
        role = entry["role"]
        prev = codecs.get(role)
        if prev is None:
            codecs[role] = (label, 1)
        else:  # a role whose tensors use different settings shows the first, counts all
            codecs[role] = (prev[0] if prev[0] == label else f"{prev[0]}, …", prev[1] + 1)
    return {
        "hash": digest,
        "pack_bytes": path.stat().st_size,
        "delta_bytes": delta,
        "codecs": codecs,
        "target": doc["header"].get("target"),  # a quality target's evaluations, if any
    }


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def file_digests(path: Path) -> dict[str, Any]:
    """Size, SHA-256 (what ``sha256sum`` prints) and xxh3-128 (graftbuild's hash), one pass."""
    sha, xx, size = hashlib.sha256(), xxhash.xxh3_128(), 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
            xx.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": sha.hexdigest(), "xxh3_128": xx.hexdigest()}


def write_manifest(folder: Path) -> None:
    """``graftbuild-manifest.json``: every file of the folder (the card included) but itself."""
    files = {
        rel: file_digests(p)
        for rel, p in iter_files(folder, keep=lambda rel: rel != MANIFEST_FILE)
        if not any(part.startswith(".") for part in rel.split("/"))
    }
    doc = {"format": "graftbuild-manifest/1", "files": files}
    (folder / MANIFEST_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def base_step(recipe: Recipe) -> str:
    """How the base is made, for the card: a folder, a seeded init, or an init trained here."""
    if recipe.base.path is not None:
        return "input"
    return "sft" if recipe.base.finetune is not None else "init"


def release_node(recipe: Recipe, r: ReleaseSpec, out: Path) -> Node:
    """``release:NAME``: the fused model, its model card and manifest. Everything the card shows
    is an input: the fused model, base, packs and evals by hash, the rest in its config."""
    from graftbuild.release.gates import gate_config

    fuse = next(f for f in recipe.fuse if f.name == (r.fuse or r.name))
    evals = recipe.release_evals(r)
    deps = {"model": ids.fuse(fuse.name), "base": ids.BASE}
    deps |= {f"pack.{i}": ids.pack(p) for i, p in enumerate(fuse.packs)}
    deps |= {f"eval.{j}": ids.eval_(e.name) for j, e in enumerate(evals)}
    files = {}
    if recipe.base.path is not None and (recipe.base.path / "README.md").is_file():
        files["base_card"] = recipe.base.path / "README.md"  # license etc. (not in the base hash)
    config = {
        "project": {"name": recipe.project.name, "version": recipe.project.version},
        "card": {
            "license": r.license,
            "base_model": r.base_model or recipe.base.model,  # a hub id names the base
            "tags": r.tags,
        },
        "fuse": {
            "name": fuse.name,
            "packs": fuse.packs,
            "weights": fuse.weight_list(),
            "strategy": fuse.strategy,
            "options": fuse.options,
        },
        "compression": {p: recipe.sources[p].compression for p in fuse.packs},
        "base": base_step(recipe),
        "evals": [{"name": e.name, "models": e.models} | gate_config(e) for e in evals],
    }
    return Node(
        ids.release(r.name),
        "release",
        config=config,
        deps=deps,
        files=files,
        labels={"dep:model": f"fused model '{fuse.name}' changed", "config.card": "card changed"}
        | {f"dep:eval.{j}": f"eval '{e.name}' changed" for j, e in enumerate(evals)}
        | {"config.evals": "release gates changed", "file:base_card": "base model card changed"},
        output=r.output or out / "release" / r.name,
    )
