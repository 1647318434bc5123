"""``graftbuild init [--base PATH] [--source NAME=PATH ...]``: write a commented starter recipe."""

from __future__ import annotations

import re
from pathlib import Path

import click

from graftbuild.cli.common import console
from graftbuild.errors import UserError

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


@click.command()
@click.option("--base", type=click.Path(path_type=Path), help="The base model folder.")
@click.option(
    "--source", "sources", multiple=True, metavar="NAME=PATH", help="A fine-tune (repeatable)."
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=Path("graftbuild.toml"),
    show_default=True,
    help="The recipe to write.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing recipe.")
def init(base: Path | None, sources: tuple[str, ...], output: Path, force: bool) -> None:
    """Write a commented recipe for a base model and its fine-tunes."""
    from graftbuild.recipe.scaffold import render

    parsed: list[tuple[str, Path]] = []
    for s in sources:
        name, sep, path = s.partition("=")
        if not sep or not NAME.match(name) or not path:
            raise UserError(f"--source {s!r}: expected NAME=PATH, NAME a letter then [A-Za-z0-9_-]")
        if name in {n for n, _ in parsed}:
            raise UserError(f"--source {s!r}: the name {name!r} is given twice")
        parsed.append((name, Path(path)))
    for what, folder in [("--base", base)] + [(f"--source {n}", p) for n, p in parsed]:
        if (
            folder is not None
            and not (folder / "config.json").is_file()
            and not (folder / "adapter_config.json").is_file()
        ):
            raise UserError(f"{what}: {folder} is not a model folder (no config.json)")
    if output.exists() and not force:
        raise UserError(f"{output}: already exists; pass --force to overwrite it")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render(output, base, parsed))
    todo = base is None or not parsed
    console().print(
        f"wrote {output}"
        + ("; fill in the TODO paths, then" if todo else "; next:")
        + f" graftbuild plan {output}"
    )
