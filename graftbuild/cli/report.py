"""``graftbuild report [RECIPE] -o report.html``: one self-contained page about a built recipe:
its nodes and DAG, the eval table with a chart per dataset, each pack's plot, the release gates
and the lockfile's environments (graftbuild/release/html.py). Reads the cache; builds nothing.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import click

from graftbuild.cli.common import open_engine, split_args


@click.command()
@click.argument("args", nargs=-1)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    default="report.html",
    show_default=True,
    help="Where to write the HTML page.",
)
@click.option(
    "--cache", type=click.Path(path_type=Path), help="Cache folder (overrides the recipe)."
)
def report(args: tuple[str, ...], output: Path, cache: Path | None) -> None:
    """Write an HTML report of the recipe's last build (what the cache holds for it)."""
    from graftbuild.release.html import render

    recipe_path, targets = split_args(args)
    data = gather(recipe_path, cache, targets)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render(data), encoding="utf-8")
    built = sum(1 for n in data.nodes if n["state"] == "built")
    click.echo(f"report: {output} ({built} of {len(data.nodes)} nodes built)")


def gather(recipe_path: Path, cache: Path | None, targets: list[str]) -> Any:
    from graftbuild.build import lockfile
    from graftbuild.build.results import MakeResult
    from graftbuild.cli.graph import render as render_graph
    from graftbuild.release.gates import evaluate
    from graftbuild.release.html import ReportData
    from graftbuild.skillpack.format import PACK_FILE
    from graftbuild.skillpack.report import pack_report

    engine = open_engine(recipe_path, cache, quiet=True)
    with engine.store.lock():
        results = engine.plan(targets or None)
    assert engine.recipe.path is not None
    lock = lockfile.load(lockfile.lock_path(engine.recipe.path)) or {}
    locked = lock.get("nodes", {})
    by_id = {r.id: r for r in results}

    def folder(node_id: str) -> Path | None:
        node, r = engine.graph.node(node_id), by_id.get(node_id)
        if node.is_input:
            return node.path
        return engine.store.object_path(r.output_hash) if r and r.output_hash else None

    nodes = []
    for r in results:
        node = engine.graph.node(r.id)
        nodes.append(
            {
                "id": r.id,
                "step": node.step,
                "state": "built" if r.state == "fresh" else "stale",
                "output_hash": r.output_hash,
                "output": str(node.output or node.path or ""),
                "deps": dict(node.deps),
                "env": (locked.get(r.id) or {}).get("env"),
            }
        )
    evals = []
    for spec in engine.recipe.eval:
        where = folder(f"eval:{spec.name}") if f"eval:{spec.name}" in by_id else None
        if where is None:
            continue
        metrics = json.loads((where / "metrics.json").read_text())
        models = engine.graph.node(f"eval:{spec.name}").config["models"]
        evals.append({"name": spec.name, "models": models, "metrics": metrics})
    packs = []
    for r in results:
        if not r.id.startswith("pack:") or r.output_hash is None:
            continue
        node = engine.graph.node(r.id)
        rep = pack_report(
            folder(r.id) / PACK_FILE,  # type: ignore[operator]
            folder(node.deps["base"]),
            folder(node.deps["source"]),
        )
        png, note = None, None
        try:
            from graftbuild.skillpack.plot import plot_report

            png = plot_report(rep, r.id)
        except Exception as e:  # matplotlib missing: the tables stay
            note = f"no plot: {e}"
        packs.append({"name": r.id.removeprefix("pack:"), "report": rep, "png": png, "note": note})
    gates = [
        {"describe": g.describe(), "passed": g.passed, "json": g.to_json()}
        for g in evaluate(engine, MakeResult(results, []))
    ]
    env_nodes: dict[str, list[str]] = {}
    for nid, entry in locked.items():
        if entry.get("env"):
            env_nodes.setdefault(entry["env"], []).append(nid)
    return ReportData(
        project=engine.recipe.project.name,
        version=str(engine.recipe.project.version or ""),
        recipe=str(engine.recipe.path),
        nodes=nodes,
        graph_text=render_graph(engine.graph, "text"),
        evals=evals,
        packs=packs,
        gates=gates,
        environments=lock.get("environments", {}),
        env_nodes=env_nodes,
        generated=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )
