"""``graftbuild pull [RECIPE] [TARGET...]``: download what the remote has into the local cache."""

from __future__ import annotations

import json
from pathlib import Path

import click

from graftbuild.cli.common import console, open_engine, recipe_options, split_args
from graftbuild.errors import UserError


@click.command()
@recipe_options
def pull(args: tuple[str, ...], cache: Path | None, as_json: bool) -> None:
    """Download every node of the recipe that the remote cache holds into the local cache.

    A node's key depends on its inputs' output hashes, so this walks down the DAG in rounds:
    each round downloads the nodes whose keys became known in the previous one. Output folders
    are written by the next ``make`` (which then builds nothing that was pulled).
    """
    recipe_path, targets = split_args(args)
    engine = open_engine(recipe_path, cache, quiet=as_json, strict_remote=True)
    remote = engine.remote
    if remote is None:
        raise UserError(f"{engine.recipe.path}: no [project] remote configured")
    pulled: list[str] = []
    with engine.store.lock():
        progress = True
        while progress:
            progress = False
            for n in engine.plan(targets or None):
                wanted = n.key is not None and n.output_hash is None and n.id not in pulled
                if wanted and remote.fetch(n.key, engine.store, n.id) is not None:  # type: ignore[arg-type]
                    pulled.append(n.id)
                    progress = True
        missing = [n.id for n in engine.plan(targets or None) if n.output_hash is None]
        engine.store.stat_cache.save()
    if as_json:
        click.echo(json.dumps({"pulled": pulled, "missing": missing}))
    else:
        console().print(
            f"pulled {len(pulled)} node(s) from {remote.url}; not on it: {len(missing)}"
        )
