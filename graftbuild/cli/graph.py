"""``graftbuild graph [RECIPE] --format dot|mermaid|text``: the recipe's DAG, without building."""

from __future__ import annotations

from typing import Any

import click

from graftbuild.cli.common import split_args


def _edges(bg: Any) -> list[tuple[str, str, str]]:
    """(upstream, downstream, role) in a stable order."""
    out = []
    for node in bg.order():
        for role, dep in sorted(node.deps.items()):
            out.append((dep, node.id, role))
    return out


def render(bg: Any, fmt: str) -> str:
    nodes = bg.order()
    if fmt == "text":
        lines = []
        for n in nodes:
            deps = ", ".join(f"{d} ({r})" for r, d in sorted(n.deps.items()))
            lines.append(f"{n.id}  [{n.step}]" + (f"  <- {deps}" if deps else ""))
        return "\n".join(lines)
    if fmt == "dot":
        lines = ["digraph graftbuild {", "  rankdir=LR;", "  node [shape=box];"]
        lines += [f'  "{n.id}" [label="{n.id}\\n{n.step}"];' for n in nodes]
        lines += [f'  "{a}" -> "{b}" [label="{r}"];' for a, b, r in _edges(bg)]
        return "\n".join([*lines, "}"])
    ids = {n.id: f"n{i}" for i, n in enumerate(nodes)}
    lines = ["flowchart LR"]
    lines += [f'  {ids[n.id]}["{n.id}<br/>{n.step}"]' for n in nodes]
    lines += [f"  {ids[a]} -->|{r}| {ids[b]}" for a, b, r in _edges(bg)]
    return "\n".join(lines)


@click.command()
@click.argument("args", nargs=-1)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "dot", "mermaid"]),
    default="text",
    show_default=True,
)
def graph(args: tuple[str, ...], fmt: str) -> None:
    """Print the recipe's nodes and their inputs (Graphviz dot, Mermaid or plain text)."""
    from graftbuild.build.graph import build_graph
    from graftbuild.recipe import load_recipe

    recipe_path, targets = split_args(args)
    bg = build_graph(load_recipe(recipe_path))
    if targets:
        keep = {n.id for n in bg.order(targets)}
        bg.graph = bg.graph.subgraph(keep).copy()
    click.echo(render(bg, fmt))
