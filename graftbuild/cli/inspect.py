"""``graftbuild inspect PACK``: what a SkillPack stores, tensor by tensor, per layer and per role
(the report: graftbuild/skillpack/report.py).

PACK is a pack file, a folder holding ``skillpack.safetensors``, or ``pack:NAME`` of a recipe
(built already). The relative error ``‖Δ − Δ̂‖ / ‖Δ‖`` is shown when the delta's models are
reachable: ``--base`` and ``--source`` folders, or the recipe's base and source for ``pack:NAME``.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from graftbuild.cli.common import DEFAULT_RECIPE, console
from graftbuild.errors import UserError


def resolve_pack(
    pack: str, recipe: Path, cache: Path | None
) -> tuple[Path, Path | None, Path | None]:
    """(pack file, base folder, source folder) of PACK as given on the command line."""
    from graftbuild.skillpack.format import PACK_FILE

    if not pack.startswith("pack:"):
        path = Path(pack)
        if path.is_dir():
            path = path / PACK_FILE
        if not path.is_file():
            raise UserError(
                f"{pack}: no such SkillPack (a file, a folder holding {PACK_FILE}, "
                "or pack:NAME with a recipe)"
            )
        return path, None, None
    from graftbuild.cli.common import open_engine

    name = pack.removeprefix("pack:")
    engine = open_engine(recipe, cache, quiet=True)
    if f"pack:{name}" not in engine.graph.graph:
        packs = sorted(n for n in engine.graph.graph if n.startswith("pack:"))
        raise UserError(f"{recipe}: no pack {name!r}; packs: {packs}")
    with engine.store.lock():
        results = {r.id: r for r in engine.plan([pack])}
    found = results[pack]
    if found.output_hash is None:
        raise UserError(f"{pack} is not built yet; run `graftbuild make {pack}` first")

    def folder(node_id: str) -> Path | None:
        node = engine.graph.node(node_id)
        digest = results[node_id].output_hash
        if node.is_input:
            return node.path
        return engine.store.object_path(digest) if digest else None

    return (
        engine.store.object_path(found.output_hash) / PACK_FILE,
        folder("base"),
        folder(engine.graph.node(pack).deps["source"]),
    )


@click.command()
@click.argument("pack")
@click.option(
    "--recipe",
    type=click.Path(path_type=Path),
    default=DEFAULT_RECIPE,
    show_default=True,
    help="Recipe for pack:NAME.",
)
@click.option(
    "--cache", type=click.Path(path_type=Path), help="Cache folder (overrides the recipe)."
)
@click.option("--base", type=click.Path(path_type=Path, file_okay=False), help="Base model folder.")
@click.option(
    "--source",
    type=click.Path(path_type=Path, file_okay=False),
    help="Source model folder (with --base: show relative errors).",
)
@click.option(
    "--heldout",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Held-out text: show the graft's share of the fine-tune's improvement in loss on it.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@click.option(
    "--plot",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also draw the pack per layer and role (bytes, kept fraction, energy kept) into this "
    "PNG (1200x900; pip install 'graftbuild[plot]').",
)
def inspect(
    pack: str,
    recipe: Path,
    cache: Path | None,
    base: Path | None,
    source: Path | None,
    heldout: Path | None,
    as_json: bool,
    plot: Path | None = None,
) -> None:
    """Show a SkillPack's codecs, ranks, bits, bytes and errors per tensor, layer and role."""
    if (base is None) != (source is None):
        raise UserError("--base and --source go together (the delta is source − base)")
    from graftbuild.skillpack.report import pack_report

    path, rbase, rsource = resolve_pack(pack, recipe, cache)
    report = pack_report(path, base or rbase, source or rsource)
    if heldout is not None:
        from graftbuild.skillpack.report import improvement_kept

        if (base or rbase) is None or (source or rsource) is None:
            raise UserError("--heldout needs the delta's models: pack:NAME, or --base and --source")
        report["heldout"] = improvement_kept(path, base or rbase, source or rsource, heldout)
    if plot is not None:
        from graftbuild.skillpack.plot import plot_report

        plot.write_bytes(plot_report(report, pack))
    if as_json:
        click.echo(json.dumps(report))
        return
    out = console()
    if not out.is_terminal:
        out.width = 200  # piped: whole tensor names, one row per line
    with_err = report["tensors"] and report["tensors"][0]["rel_error"] is not None
    out.print(
        f"{report['pack']}: format {report['format_version']}, {report['payload_bytes']:,} bytes "
        f"of payload ({report['size_vs_fp16']:.2%} of the fp16 delta), file "
        f"{report['file_bytes']:,} bytes (header {report['header_bytes']:,})"
        + (
            f", {report['file_vs_budget']:.1%} of its budget"
            if report.get("file_vs_budget") is not None
            else ""
        )
        + (f", relative error {report['rel_error']:.4f}" if with_err else "")
    )
    if report.get("heldout"):
        h = report["heldout"]
        out.print(
            f"held-out {h['data']}: loss base {h['loss_base']:.4f}, source "
            f"{h['loss_source']:.4f}, graft {h['loss_graft']:.4f}: the graft keeps "
            f"{h['keep']:.1%} of the fine-tune's improvement"
        )
    cols = ["tensor", "layer", "role", "codec", "rank", "bits per band", "keep", "bytes", "share"]
    table = Table(*cols, *(["rel err"] if with_err else []), box=None, pad_edge=False)
    for t in report["tensors"]:
        bands = " ".join(f"{b['bits']}b×{b['rank']}" for b in t["bands"] or [])
        table.add_row(
            t["name"],
            t["layer"],
            t["role"],
            t["codec"] + (f" ({t['quantizer']})" if t.get("quantizer") else ""),
            "" if t["rank"] is None else str(t["rank"]),
            bands,
            "" if t["keep"] is None else f"{t['keep']:.2%}",
            f"{t['bytes']:,}",
            f"{t['share']:.1%}",
            *([f"{t['rel_error']:.4f}"] if with_err else []),
        )
    out.print(table)
    for key in ("role", "layer"):
        heads = [key, "tensors", "codecs", "bytes", "share", *(["rel err"] if with_err else [])]
        summary = Table(*heads, box=None, pad_edge=False)
        for r in report[f"by_{key}"]:
            summary.add_row(
                r[key],
                str(r["tensors"]),
                ", ".join(r["codecs"]),
                f"{r['bytes']:,}",
                f"{r['share']:.1%}",
                *([f"{r['rel_error']:.4f}"] if with_err else []),
            )
        out.print(f"\nper {key}:")
        out.print(summary)
