"""The planner: every node kind contributes its nodes (``graftbuild/steps/``); this module puts them
into a networkx DAG and checks it.

Node ids are what users type on the command line (``base``, ``pack:NAME``, ...; spelled in
``graftbuild/recipe/ids.py``). A node names its step, its normalised config, its upstream nodes
(``deps``, by role), the external files it reads (``files``, by role) and the versions of the
components it uses: with the step's version, everything its key is made of (build/keys.py).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import networkx as nx

from graftbuild.errors import UserError
from graftbuild.recipe import Recipe
from graftbuild.steps.base import Node

__all__ = ["BuildGraph", "Node", "build_graph"]


@dataclass
class BuildGraph:
    recipe: Recipe
    graph: nx.DiGraph

    def node(self, node_id: str) -> Node:
        return self.graph.nodes[node_id]["node"]

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.graph

    def ids(self) -> list[str]:
        return sorted(self.graph)

    def order(self, targets: list[str] | None = None) -> list[Node]:
        """Nodes in a deterministic topological order, restricted to ``targets`` and their
        ancestors when given."""
        g = self.graph
        if targets:
            missing = [t for t in targets if t not in g]
            if missing:
                hints = [difflib.get_close_matches(t, list(g), n=1) for t in missing]
                hint = "".join(f" (did you mean {h[0]!r}?)" for h in hints if h)
                raise UserError(f"unknown target(s) {missing}{hint}; nodes: {sorted(g)}")
            keep = set(targets)
            for t in targets:
                keep |= nx.ancestors(g, t)
            g = g.subgraph(keep)
        return [self.node(n) for n in nx.lexicographical_topological_sort(g)]


def build_graph(recipe: Recipe) -> BuildGraph:
    """Every kind's nodes for ``recipe``, as a checked DAG; the models' configs and headers are
    checked first (pre-flight: a source that does not fit the base is refused before any node
    runs)."""
    from graftbuild.steps import STEPS
    from graftbuild.steps.preflight import check

    check(recipe)

    out = recipe.project.out or recipe.root / "out"
    g = nx.DiGraph()
    for step in STEPS.values():
        for n in step.nodes(recipe, out):
            if n.id in g:
                raise UserError(f"{recipe.path}: two nodes are named {n.id!r}")
            g.add_node(n.id, node=n)
    for node_id in list(g):
        n = g.nodes[node_id]["node"]
        for role, dep in n.deps.items():
            if dep not in g:
                raise UserError(
                    f"{recipe.path}: {n.id} ({role}) needs {dep!r}, which no node builds"
                )
            g.add_edge(dep, n.id)
    if not nx.is_directed_acyclic_graph(g):
        cycle = " -> ".join(a for a, _ in nx.find_cycle(g))
        raise UserError(f"{recipe.path}: the recipe's nodes form a cycle: {cycle}")
    return BuildGraph(recipe, g)
