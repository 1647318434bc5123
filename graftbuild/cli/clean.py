"""``graftbuild clean [RECIPE] [TARGET...]``: remove the recipe's materialised output folders.

Only folders carrying graftbuild's marker (``.graftbuild.json``) are removed, never a user's own
folder; emptied parent folders under the output root go too. The cache is left alone (its
objects still hold every artifact, so the next ``make`` restores the folders without
rebuilding); ``graftbuild gc`` is what frees cache space.
"""

from __future__ import annotations

import json

import click

from graftbuild.cli.common import console, split_args


@click.command()
@click.argument("args", nargs=-1)
@click.option("-n", "--dry-run", is_flag=True, help="List what would be removed.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
def clean(args: tuple[str, ...], dry_run: bool, as_json: bool) -> None:
    """Remove the output folders graftbuild materialised for the recipe (the cache stays)."""
    from graftbuild.build.graph import build_graph
    from graftbuild.cache.store import owned, remove_output
    from graftbuild.errors import UserError
    from graftbuild.recipe import load_recipe

    recipe_path, targets = split_args(args)
    recipe = load_recipe(recipe_path)
    bg = build_graph(recipe)
    out_root = (recipe.project.out or recipe.root / "out").resolve()
    removed: list[str] = []
    skipped: list[str] = []
    for node in bg.order(targets or None):
        folder = node.output
        if folder is None:
            continue
        try:
            if not owned(folder):  # nothing there
                continue
        except UserError:  # a user's file or folder, a link, a device: never removed
            skipped.append(str(folder))
            continue
        removed.append(str(folder))
        if dry_run:
            continue
        remove_output(folder)
        parent = folder.parent
        while parent != out_root and out_root in parent.parents and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    if as_json:
        click.echo(json.dumps({"removed": removed, "skipped": skipped, "dry_run": dry_run}))
        return
    out = console()
    for f in removed:
        out.print(f"{'would remove' if dry_run else 'removed'} {f}")
    for f in skipped:
        out.print(f"[yellow]kept {f}: not written by graftbuild[/]")
    if not removed:
        out.print("nothing to clean")
