"""``graftbuild export peft PACK OUT`` and ``export bundle SRC OUT``: packs as adapters that
PEFT, vLLM and LoRAX load (graftbuild/release/peft.py, graftbuild/release/serving.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from graftbuild.cli.common import DEFAULT_RECIPE, console
from graftbuild.errors import UserError


@click.group()
def export() -> None:
    """Export packs to other formats."""


@dataclass
class Resolved:
    """What ``export peft`` needs of PACK: the pack files of its chain (root first), the base
    folder, held-out data and provenance, as far as they are known."""

    layers: list[tuple[Path, float]]
    base: Path | None = None
    data: Path | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    sources: list[Path | None] | None = None  # each pack's source (a reference pack reads it)


def resolve_pack(pack: str, recipe: Path, cache: Path | None) -> Path:
    """A SkillPack file from a path (file or pack folder) or a built pack's name in the recipe."""
    return resolve_export(pack, recipe, cache).layers[-1][0]


def resolve_export(pack: str, recipe: Path, cache: Path | None) -> Resolved:
    from graftbuild.recipe import ids
    from graftbuild.skillpack.format import PACK_FILE

    path = Path(pack)
    if path.is_file():
        return Resolved([(path, 1.0)])
    if (path / PACK_FILE).is_file():
        return Resolved([(path / PACK_FILE, 1.0)])
    from graftbuild.cli.common import open_engine

    engine = open_engine(recipe, cache, quiet=True)
    node_id = pack if pack.startswith("pack:") else ids.pack(pack)
    if node_id not in engine.graph.graph:
        raise UserError(f"{pack}: neither a SkillPack file nor a pack of {recipe}")
    name = ids.name_of(node_id)
    r = engine.recipe
    chain = [ids.pack(p) for p in r.chain(name)]
    found = {n.id: n for n in engine.plan([*chain, ids.BASE])}
    for nid in [*chain, ids.BASE]:
        if found[nid].output_hash is None:
            raise UserError(f"{nid} is not built yet; run `graftbuild make {recipe} {node_id}`")
    layers = [
        (engine.artifact_path(n, found[n].output_hash) / PACK_FILE, 1.0)  # type: ignore[arg-type]
        for n in chain
    ]
    sources: list[Path | None] = []
    for n in chain:
        dep = engine.graph.node(n).deps.get("source")
        digest = found[dep].output_hash if dep in found else None
        sources.append(engine.artifact_path(dep, digest) if dep and digest else None)
    base_hash = found[ids.BASE].output_hash
    base = engine.artifact_path(ids.BASE, base_hash)  # type: ignore[arg-type]
    data = next((e.data[name] for e in r.eval if name in e.data), None)
    provenance = {
        "packs": [
            {"name": ids.name_of(n), "hash": found[n].output_hash, "weight": 1.0} for n in chain
        ],
        "base": base_hash,
    }
    return Resolved(layers, base, data, provenance, sources)


TARGET = click.option(
    "--target",
    type=click.Choice(["peft", "vllm", "lorax"]),
    default="peft",
    show_default=True,
    help="The server the adapter is for; its rules are enforced.",
)
MAX_RANK = click.option(
    "--max-rank",
    type=int,
    help="Largest LoRA rank (default: none for peft, 64 for vllm and lorax; vllm at most 512).",
)
TOLERANCE = click.option(
    "--tolerance",
    type=float,
    default=1e-3,
    show_default=True,
    help="Relative error at which embedding, head and exact deltas are factored by SVD.",
)
MAX_ERROR = click.option(
    "--max-error",
    type=float,
    help="Refuse (exit 2) when the rank cap costs a module more than this relative error.",
)
EXTRAS = click.option(
    "--extras",
    type=click.Choice(["patch", "refuse", "drop"]),
    default=None,
    help="Deltas the target cannot carry: a base-variant patch file beside the adapter "
    "(default for one adapter), exit 2, or left out (recorded in the card).",
)
DTYPE = click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
    help="dtype of the LoRA factors.",
)
RECIPE = click.option(
    "--recipe",
    type=click.Path(path_type=Path),
    default=DEFAULT_RECIPE,
    show_default=True,
    help="Recipe that names PACK (when PACK is not a path).",
)


def _print_report(out: Path, report: Any) -> None:
    c = console()
    c.print(f"wrote {out}: {len(report.modules)} LoRA modules ({report.adapter_bytes} bytes)")
    costly = sorted(
        ((e, m) for m, e in report.errors.items() if e > report.tolerance), reverse=True
    )
    if costly:
        c.print(f"rank cap {report.max_rank}: relative error per module (above the tolerance):")
        for err, module in costly:
            c.print(f"  {module}: {err:.4f} at rank {report.modules[module]}")
    if report.saved:
        c.print(f"modules_to_save: {len(report.saved)}")
    if report.base_variant:
        c.print(f"base variant (base_variant.safetensors): {len(report.base_variant)} tensors")
        for name, why in report.base_variant.items():
            c.print(f"  {name}: {why}")
    if report.left_out:
        c.print(f"left out (--extras drop): {len(report.left_out)} tensors")
        for name, why in report.left_out.items():
            c.print(f"  {name}: {why}")
    q = report.quality
    if q and "kept" in q:
        c.print(f"skill kept on {q['data']}: {q['kept']:.3f}")


@export.command("peft")
@click.argument("pack")
@click.argument("out", type=click.Path(path_type=Path))
@TARGET
@MAX_RANK
@TOLERANCE
@MAX_ERROR
@EXTRAS
@DTYPE
@click.option(
    "--base",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    help="Base model folder (default: the recipe's base when PACK is a pack name).",
)
@click.option(
    "--data",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Held-out text for the quality card (default: the recipe eval's dataset named "
    "after the pack).",
)
@click.option(
    "--samples",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Held-out texts used.",
)
@RECIPE
@click.option("--cache", type=click.Path(path_type=Path), help="Cache folder.")
@click.option("--base-model", help="base_model_name_or_path to write into adapter_config.json.")
def peft(
    pack: str,
    out: Path,
    target: str,
    max_rank: int | None,
    tolerance: float,
    max_error: float | None,
    extras: str | None,
    dtype: str,
    base: Path | None,
    data: Path | None,
    samples: int,
    recipe: Path,
    cache: Path | None,
    base_model: str | None,
) -> None:
    """Write PACK as a LoRA adapter for a serving target in OUT, with a README card.

    PACK is a skillpack.safetensors file, a pack folder, or a pack name of the recipe (then the
    recipe's base, the pack's chain and its eval data are used).
    """
    from graftbuild.release.peft import export_adapter

    got = resolve_export(pack, recipe, cache)
    report = export_adapter(
        got.layers,
        out,
        base=base or got.base,
        target=target,
        max_rank=max_rank,
        tolerance=tolerance,
        max_error=max_error,
        extras=extras or "patch",
        dtype=dtype,
        base_model=base_model,
        data=data or got.data,
        samples=samples,
        provenance=got.provenance,
        sources=got.sources,
    )
    _print_report(out, report)


@export.command("bundle")
@click.argument("src")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--target", type=click.Choice(["peft", "vllm"]), default="peft", show_default=True)
@MAX_RANK
@TOLERANCE
@MAX_ERROR
@EXTRAS
@DTYPE
@click.option(
    "--data",
    multiple=True,
    metavar="PACK=FILE",
    help="Held-out text for a pack's quality card (repeatable; default: the recipe's evals).",
)
@RECIPE
@click.option("--cache", type=click.Path(path_type=Path), help="Cache folder.")
def bundle(
    src: str,
    out: Path,
    target: str,
    max_rank: int | None,
    tolerance: float,
    max_error: float | None,
    extras: str | None,
    dtype: str,
    data: tuple[str, ...],
    recipe: Path,
    cache: Path | None,
) -> None:
    """Write a routed bundle as one adapter per pack, the router and a serving example in OUT.

    SRC is a routed bundle folder or the name of a routed [[fuse]] of the recipe.
    """
    from graftbuild.release.serving import export_bundle

    folder, files = _resolve_bundle(src, recipe, cache)
    for item in data:
        name, sep, file = item.partition("=")
        if not sep or not Path(file).is_file():
            raise UserError(f"--data {item!r}: expected PACK=FILE naming an existing file")
        files[name] = Path(file)
    reports = export_bundle(
        folder,
        out,
        target=target,
        max_rank=max_rank,
        tolerance=tolerance,
        max_error=max_error,
        extras=extras or ("patch" if target == "peft" else "refuse"),
        dtype=dtype,
        data=files,
    )
    c = console()
    for name, report in reports.items():
        kept = (report.quality or {}).get("kept")
        c.print(
            f"{name}: {len(report.modules)} LoRA modules, {report.adapter_bytes} bytes"
            + (f", skill kept {kept:.3f}" if kept is not None else "")
        )
    c.print(f"wrote {out} (serve it: {out}/serve_peft.py; vLLM and LoRAX: {out}/README.md)")


def _resolve_bundle(src: str, recipe: Path, cache: Path | None) -> tuple[Path, dict[str, Path]]:
    """A bundle folder and held-out data per pack (from the recipe's evals, when SRC is a
    routed fuse of the recipe)."""
    from graftbuild.recipe import ids
    from graftbuild.runtime.bundle import BUNDLE_FILE

    path = Path(src)
    if (path / BUNDLE_FILE).is_file():
        return path, {}
    from graftbuild.cli.common import open_engine

    engine = open_engine(recipe, cache, quiet=True)
    node_id = src if src.startswith("fuse:") else ids.fuse(src)
    if node_id not in engine.graph.graph:
        raise UserError(f"{src}: neither a bundle folder nor a routed fuse of {recipe}")
    if engine.graph.node(node_id).step != "bundle":
        raise UserError(f'{node_id} is not a routed fuse (strategy = "routed")')
    node = next(n for n in engine.plan([node_id]) if n.id == node_id)
    if node.output_hash is None:
        raise UserError(f"{node_id} is not built yet; run `graftbuild make {recipe} {node_id}`")
    files: dict[str, Path] = {}
    for e in engine.recipe.eval:
        for name, file in e.data.items():
            files.setdefault(name, file)
    return engine.store.object_path(node.output_hash), files
