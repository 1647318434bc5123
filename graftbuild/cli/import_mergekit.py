"""``graftbuild import mergekit CONFIG.yml -o recipe.toml``: a mergekit config as a recipe."""

from __future__ import annotations

from pathlib import Path

import click

from graftbuild.cli.common import console


@click.group("import")
def import_() -> None:
    """Write a recipe from another tool's config."""


@import_.command("mergekit")
@click.argument("config", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=Path("graftbuild.toml"),
    show_default=True,
    help="The recipe to write.",
)
@click.option("--seed", type=int, help="Seed of random methods (mergekit's --random-seed).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def mergekit(config: Path, output: Path, seed: int | None, force: bool) -> None:
    """Write a recipe that builds what mergekit's CONFIG merges (exit 2 naming the key it
    cannot express). Hub ids are read from the local Hugging Face cache, offline."""
    from graftbuild.errors import UserError
    from graftbuild.recipe import load_recipe
    from graftbuild.recipe.mergekit import convert, to_toml

    if output.exists() and not force:
        raise UserError(f"{output} exists; pass --force to overwrite it")
    recipe = convert(config, seed)
    here = output.parent.resolve()
    for table in [recipe["base"], *recipe["sources"].values()]:
        path = Path(table["path"])
        if path.is_relative_to(here):  # inside the recipe's folder: relative, so it travels
            table["path"] = str(path.relative_to(here))
    text = to_toml(recipe, f"# Imported from {config} by `graftbuild import mergekit`.\n")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(text)
    try:
        load_recipe(tmp)  # what we write must load (any gap is an error here, not later)
    except UserError as e:
        tmp.unlink()
        raise UserError(str(e).replace(str(tmp.resolve()), str(config))) from None
    tmp.replace(output)
    fuse = recipe["fuse"][0]
    console().print(
        f"wrote {output}: {fuse['strategy']} of {len(fuse['packs'])} model(s) on "
        f"{recipe['base']['path']}; build it with `graftbuild make {output}`"
    )
