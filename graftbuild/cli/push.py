"""``graftbuild push [RECIPE] [TARGET...]``: upload what the local cache holds to the remote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
    notes = reference_notes(engine, pushed)
    if as_json:
        click.echo(json.dumps({"pushed": pushed, "notes": notes}))
    else:
        console().print(f"pushed {len(pushed)} node(s) to {remote.url}")
        for line in notes:
            console(stderr=True).print(line, markup=False)


def reference_notes(engine: Any, pushed: list[str]) -> list[str]:
    """A line for each pushed reference pack whose source is a user folder: the remote holds
    the pack (the source's hash), not those weights (docs/SKILLPACK_FORMAT.md section 8)."""
    from graftbuild.skillpack.format import METADATA_KEY, PACK_FILE
    from graftbuild.weights.tensors import read_header

    lines = []
    outputs = {n.id: n.output_hash for n in engine.plan()}
    for node_id in pushed:
        node = engine.graph.node(node_id)
        source = engine.graph.node(node.deps["source"]) if "source" in node.deps else None
        if node.step != "pack" or source is None or not source.is_input:
            continue
        path = engine.store.object_path(outputs[node_id]) / PACK_FILE
        doc = json.loads(read_header(path)["__metadata__"][METADATA_KEY])
        if "reference" in doc.get("header", {}):
            lines.append(
                f"note: {node_id} is a reference pack (lossless): the remote holds the hash of "
                f"{source.path}, not its weights; a machine building from it needs that folder, "
                "as every make needs its input folders"
            )
    return lines
