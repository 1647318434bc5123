"""``graftbuild inspect PACK``: what a SkillPack stores, tensor by tensor, per layer and per role.

PACK is a pack file, a folder holding ``skillpack.safetensors``, or ``pack:NAME`` of a recipe
(built already). The relative error ``‖Δ − Δ̂‖ / ‖Δ‖`` is shown when the delta's models are
reachable: ``--base`` and ``--source`` folders, or the recipe's base and source for ``pack:NAME``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from graftbuild.commands.common import DEFAULT_RECIPE, console
from graftbuild.errors import UserError

_LAYER = re.compile(r"(^|\.)(layers|layer|h|blocks|block)\.(\d+)\.")


def layer_of(name: str) -> str:
    match = _LAYER.search(name)
    return match.group(3) if match else "-"


def describe(entry: dict[str, Any]) -> dict[str, Any]:
    """Rank, bands and keep fraction of one pack entry, from its codec metadata."""
    meta = entry.get("meta", {})
    numel = math.prod(entry["shape"])
    out: dict[str, Any] = {"rank": None, "bands": None, "keep": None}
    if meta.get("fallback") == "exact" or entry["codec"] == "exact":
        out["codec"] = "exact" if entry["codec"] == "exact" else f"{entry['codec']}→exact"
        return out
    out["codec"] = entry["codec"]
    if entry["codec"] == "lowrank":
        out["rank"] = int(meta["rank"])
    elif entry["codec"] == "mixed":
        out["bands"] = [{"rank": int(b["rank"]), "bits": int(b["bits"])} for b in meta["bands"]]
        out["rank"] = sum(b["rank"] for b in out["bands"])
        out["quantizer"] = meta.get("quantizer")
    elif entry["codec"] == "prune":
        out["keep"] = int(meta["kept"]) / numel if numel else 0.0
    return out


def pack_report(pack: Path, base: Path | None, source: Path | None) -> dict[str, Any]:
    """Everything ``inspect`` shows, as JSON-able data."""
    from graftbuild.skillpack import PackReader

    weights: tuple[Any, Any] | None = None
    with PackReader(pack) as reader:
        if base is not None and source is not None:
            from graftbuild.tensors import ModelWeights

            weights = (ModelWeights(base), ModelWeights(source))
        try:
            tensors = []
            for name in reader.names():
                entry = reader.entries[name]
                row = {
                    "name": name,
                    "layer": layer_of(name),
                    "role": entry["role"],
                    "shape": entry["shape"],
                    "bytes": reader.entry_nbytes(name),
                    **describe(entry),
                    "rel_error": None,
                    "sq_error": None,
                    "sq_norm": None,
                }
                if weights is not None:
                    b, s = weights
                    if name not in b or name not in s:
                        raise UserError(f"{pack}: tensor {name!r} is not in the base and source")
                    delta = s.get(name).float() - b.get(name).float()
                    err = float((reader.decode(name) - delta).pow(2).sum())
                    sq = float(delta.pow(2).sum())
                    row |= {"sq_error": err, "sq_norm": sq, "rel_error": _rel(err, sq)}
                tensors.append(row)
        finally:
            if weights is not None:
                weights[0].close()
                weights[1].close()
        total = sum(t["bytes"] for t in tensors)
        fp16 = sum(2 * math.prod(t["shape"]) for t in tensors)
        report = {
            "pack": str(pack),
            "format_version": reader.format_version,
            "header": reader.header,
            "file_bytes": pack.stat().st_size,
            "payload_bytes": total,
            "fp16_delta_bytes": fp16,
            "size_vs_fp16": total / fp16 if fp16 else 0.0,
            "tensors": tensors,
        }
    for t in tensors:
        t["share"] = t["bytes"] / total if total else 0.0
    report["by_role"] = _group(tensors, "role", total)
    report["by_layer"] = _group(tensors, "layer", total)
    if weights is not None:
        err = sum(t["sq_error"] for t in tensors)
        report["rel_error"] = _rel(err, sum(t["sq_norm"] for t in tensors))
    return report


def _rel(err: float, sq: float) -> float:
    return math.sqrt(err / sq) if sq > 0 else (0.0 if err == 0 else math.inf)


def _group(tensors: list[dict[str, Any]], key: str, total: int) -> list[dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for t in tensors:
        groups.setdefault(t[key], []).append(t)
    out = []
    for name, rows in groups.items():
        nbytes = sum(t["bytes"] for t in rows)
        row = {
            key: name,
            "tensors": len(rows),
            "codecs": sorted({t["codec"] for t in rows}),
            "bytes": nbytes,
            "share": nbytes / total if total else 0.0,
            "rel_error": None,
        }
        if all(t["sq_error"] is not None for t in rows):
            row["rel_error"] = _rel(
                sum(t["sq_error"] for t in rows), sum(t["sq_norm"] for t in rows)
            )
        out.append(row)
    order = (
        (lambda r: (r[key] == "-", int(r[key]) if r[key] != "-" else 0))
        if key == "layer"
        else (lambda r: r[key])
    )
    return sorted(out, key=order)


def resolve_pack(
    pack: str, recipe: Path, cache: Path | None
) -> tuple[Path, Path | None, Path | None]:
    """(pack file, base folder, source folder) of PACK as given on the command line."""
    from graftbuild.steps.pack import PACK_FILE

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
    from graftbuild.commands.common import open_scheduler

    name = pack.removeprefix("pack:")
    sched = open_scheduler(recipe, cache, quiet=True)
    if f"pack:{name}" not in sched.graph.graph:
        packs = sorted(n for n in sched.graph.graph if n.startswith("pack:"))
        raise UserError(f"{recipe}: no pack {name!r}; packs: {packs}")
    with sched.store.lock():
        results = {r.id: r for r in sched.plan([pack])}
    found = results[pack]
    if found.output_hash is None:
        raise UserError(f"{pack} is not built yet; run `graftbuild make {pack}` first")

    def folder(node_id: str) -> Path | None:
        node = sched.graph.node(node_id)
        digest = results[node_id].output_hash
        if node.is_input:
            return node.path
        return sched.store.object_path(digest) if digest else None

    return (
        sched.store.object_path(found.output_hash) / PACK_FILE,
        folder("base"),
        folder(sched.graph.node(pack).deps["source"]),
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
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
def inspect(
    pack: str,
    recipe: Path,
    cache: Path | None,
    base: Path | None,
    source: Path | None,
    as_json: bool,
) -> None:
    """Show a SkillPack's codecs, ranks, bits, bytes and errors per tensor, layer and role."""
    if (base is None) != (source is None):
        raise UserError("--base and --source go together (the delta is source − base)")
    path, rbase, rsource = resolve_pack(pack, recipe, cache)
    report = pack_report(path, base or rbase, source or rsource)
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
        f"{report['file_bytes']:,} bytes"
        + (f", relative error {report['rel_error']:.4f}" if with_err else "")
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
