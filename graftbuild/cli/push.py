"""``graftbuild push [RECIPE] [TARGET...]``: upload what the local cache holds to the remote."""

from __future__ import annotations

import json
from pathlib import Path

import click

from graftbuild.cli.common import console, open_engine, recipe_options, split_args
from graftbuild.errors import UserError


@click.command()
@recipe_options
def push(args: tuple[str, ...], cache: Path | None, as_json: bool) -> None:
    """Upload every node of the recipe that is in the local cache to the remote cache."""
    recipe_path, targets = split_args(args)
    engine = open_engine(recipe_path, cache, quiet=as_json, strict_remote=True)
    remote = engine.remote
    if remote is None:
        raise UserError(f"{engine.recipe.path}: no [project] remote configured")
    pushed: list[str] = []
    with engine.store.lock():
        for n in engine.plan(targets or None):
            if n.key is not None and n.output_hash is not None:
                remote.push_node(n.key, n.output_hash, engine.store, n.id)
                pushed.append(n.id)
        engine.store.stat_cache.save()
    if as_json:
        click.echo(json.dumps({"pushed": pushed}))
    else:
        console().print(f"pushed {len(pushed)} node(s) to {remote.url}")
