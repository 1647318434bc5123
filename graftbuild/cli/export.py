"""``graftbuild export peft PACK OUT``: a pack as an adapter other tools load."""

from __future__ import annotations

from pathlib import Path

import click

from graftbuild.cli.common import DEFAULT_RECIPE, console
from graftbuild.errors import UserError


@click.group()
def export() -> None:
    """Export packs to other formats."""


def resolve_pack(pack: str, recipe: Path, cache: Path | None) -> Path:
    """A SkillPack file from a path (file or pack folder) or a built pack's name in the recipe."""
    from graftbuild.skillpack.format import PACK_FILE

    path = Path(pack)
    if path.is_file():
        return path
    if (path / PACK_FILE).is_file():
        return path / PACK_FILE
    from graftbuild.cli.common import open_engine

    engine = open_engine(recipe, cache, quiet=True)
    node_id = pack if pack.startswith("pack:") else f"pack:{pack}"
    if node_id not in engine.graph.graph:
        raise UserError(f"{pack}: neither a SkillPack file nor a pack of {recipe}")
    node = next(n for n in engine.plan([node_id]) if n.id == node_id)
    if node.output_hash is None:
        raise UserError(f"{node_id} is not built yet; run `graftbuild make {recipe} {node_id}`")
    return engine.store.object_path(node.output_hash) / PACK_FILE


@export.command("peft")
@click.argument("pack")
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--recipe",
    type=click.Path(path_type=Path),
    default=DEFAULT_RECIPE,
    show_default=True,
    help="Recipe that names PACK (when PACK is not a path).",
)
@click.option("--cache", type=click.Path(path_type=Path), help="Cache folder.")
@click.option("--base-model", help="base_model_name_or_path to write into adapter_config.json.")
def peft(pack: str, out: Path, recipe: Path, cache: Path | None, base_model: str | None) -> None:
    """Write PACK's low-rank parts as a PEFT LoRA adapter in OUT.

    PACK is a skillpack.safetensors file, a pack folder, or a pack name of the recipe.
    """
    from graftbuild.release.peft import export_peft

    report = export_peft(resolve_pack(pack, recipe, cache), out, base_model)
    out_console = console()
    out_console.print(f"wrote {out}: {len(report.modules)} LoRA modules")
    if report.left_out:
        out_console.print(f"left out {len(report.left_out)} tensors LoRA cannot express:")
        for name, why in report.left_out.items():
            out_console.print(f"  {name}: {why}")
