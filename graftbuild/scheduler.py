"""The scheduler: walks the DAG in topological order, asks the rebuilder whether each node is up
to date, hands stale ones to an executor, and records what it did.

``plan`` answers without building: a node below a stale one is reported stale because its inputs
are not known yet (it may still be reused through early cutoff when ``make`` runs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from graftbuild.errors import UserError
from graftbuild.graph import BuildGraph, Node, build_graph
from graftbuild.pathcheck import check_overlaps, check_writable
from graftbuild.progress import NullReporter, Reporter
from graftbuild.rebuilder import explain, explain_input, key_parts
from graftbuild.recipe import Recipe
from graftbuild.steps.base import BuildSettings, StepContext
from graftbuild.store import Store

if TYPE_CHECKING:
    from graftbuild.remote import Remote

State = Literal["fresh", "stale"]


@dataclass
class NodeResult:
    id: str
    state: State
    reasons: list[str] = field(default_factory=list)
    key: str | None = None
    output_hash: str | None = None
    action: str | None = None
    """After make: "built", "reused", "restored" (re-materialised from the cache) or "pulled"
    (downloaded from the remote cache)."""
    output: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "reasons": self.reasons}


@dataclass
class MakeResult:
    nodes: list[NodeResult]
    hashed_files: list[Path]

    def ids(self, action: str) -> list[str]:
        return [n.id for n in self.nodes if n.action == action]

    @property
    def built(self) -> list[str]:
        return self.ids("built")

    @property
    def reused(self) -> list[str]:
        return [n.id for n in self.nodes if n.action in ("reused", "restored", "pulled")]

    def node(self, node_id: str) -> NodeResult:
        return next(n for n in self.nodes if n.id == node_id)


def cache_dir(recipe: Recipe, override: Path | None = None) -> Path:
    if override is not None:
        return override
    env = os.environ.get("GRAFTBUILD_CACHE")
    if env:
        return Path(env)
    return recipe.project.cache or recipe.root / "cache"


class Scheduler:
    def __init__(
        self,
        recipe: Recipe,
        store: Store,
        settings: BuildSettings | None = None,
        reporter: Reporter | None = None,
        remote: Remote | None = None,
    ) -> None:
        self.recipe = recipe
        self.graph: BuildGraph = build_graph(recipe)
        self.store = store
        check_overlaps(self.graph, store.root)
        self.settings = settings or BuildSettings()
        self.reporter = reporter or NullReporter()
        self.remote = remote
        """Asked only on a local miss (pull), told about each build (push)."""
        assert recipe.path is not None
        self.traces = store.load_traces(recipe.path)
        self.write_lock = True
        """False for builds that must not touch the recipe's lockfile (``verify``)."""

    # -- shared --------------------------------------------------------------------------------

    def _hash_input(self, path: Path, what: str) -> Any:
        if not path.exists():
            raise UserError(f"{self.recipe.path}: {what}: path not found: {path}")
        return self.store.stat_cache.input_hash(path)

    def _input_node(self, node: Node) -> tuple[str, dict[str, str]]:
        from graftbuild.tensors import check_weight_files

        assert node.path is not None
        if not node.path.is_dir():
            raise UserError(
                f"{self.recipe.path}: {node.id}: expected a model folder, not found: {node.path}"
            )
        check_weight_files(node.path)  # refuse pickles, empty folders, truncated files
        th = self.store.stat_cache.tree(node.path)
        return th.digest, th.files

    def _file_hashes(self, node: Node) -> dict[str, str]:
        return {
            role: self._hash_input(p, f"{node.id} {role}").digest for role, p in node.files.items()
        }

    def _artifact_path(self, node: Node, digest: str) -> Path:
        return node.path if node.is_input else self.store.object_path(digest)  # type: ignore[return-value]

    def _cached(self, node: Node, key: str) -> str | None:
        """The output hash cached for ``key`` if its object is intact; a corrupt object is
        reported and removed (``make`` then rebuilds it)."""
        digest = self.store.lookup(key)
        if digest is None:
            return None
        problem = self.store.verify(digest)
        if problem is None:
            return digest
        self.reporter.log(
            f"[red]corrupt[/] cached object of {node.id}: {self.store.object_path(digest)}: "
            f"{problem}; removed, {node.id} will be rebuilt"
        )
        self.store.discard(digest)
        return None

    # -- plan ----------------------------------------------------------------------------------

    def plan(self, targets: list[str] | None = None) -> list[NodeResult]:
        from graftbuild.steps import STEPS

        outputs: dict[str, str] = {}
        results: list[NodeResult] = []
        for node in self.graph.order(targets):
            trace = self.traces.get(node.id)
            if node.is_input:
                digest, files = self._input_node(node)
                outputs[node.id] = digest
                same = trace is not None and trace.get("output") == digest
                results.append(
                    NodeResult(
                        node.id,
                        "fresh" if same else "stale",
                        [] if same else explain_input(node, files, trace),
                        output_hash=digest,
                    )
                )
                continue
            files = self._file_hashes(node)
            unknown = [d for d in node.deps.values() if d not in outputs]
            if unknown:
                known = {r: outputs.get(d, "?") for r, d in node.deps.items()}
                parts = key_parts(node, STEPS[node.step].version, known, files)
                direct = [
                    r for r in explain(node, parts, trace) if r != "output missing from the cache"
                ]
                upstream = [
                    f"{d} is stale (reused if it rebuilds to the same bytes)" for d in unknown
                ]
                changed_deps = {
                    node.labels.get(f"dep:{r}") for r, d in node.deps.items() if d in unknown
                }
                direct = [r for r in direct if r not in changed_deps]
                results.append(NodeResult(node.id, "stale", direct + upstream))
                continue
            parts = key_parts(
                node, STEPS[node.step].version, {r: outputs[d] for r, d in node.deps.items()}, files
            )
            hit = self.store.lookup(parts.key)
            problem = None if hit is None else self.store.verify(hit)
            if hit is None or problem is not None:
                reasons = explain(node, parts, trace)
                if problem is not None:
                    reasons = [f"cached object corrupt ({problem}); rebuilt by make"]
                results.append(NodeResult(node.id, "stale", reasons, key=parts.key))
                continue
            outputs[node.id] = hit
            why = None if node.output is None else self.store.output_problem(hit, node.output)
            if why is None:
                results.append(NodeResult(node.id, "fresh", key=parts.key, output_hash=hit))
            else:
                results.append(
                    NodeResult(
                        node.id,
                        "stale",
                        [f"output {why}: {node.output} (restored from the cache, no rebuild)"],
                        key=parts.key,
                        output_hash=hit,
                    )
                )
        return results

    # -- make ----------------------------------------------------------------------------------

    def make(
        self, targets: list[str] | None = None, executor: Any = None, locked: bool = False
    ) -> MakeResult:
        """Build; then write the recipe's lockfile (``locked``: check against it instead)."""
        from graftbuild import lockfile
        from graftbuild.executors.local import LocalExecutor

        executor = executor or LocalExecutor()

        def waiting(pid: str) -> None:
            self.reporter.log(
                f"waiting for another graftbuild build (pid {pid}) using {self.store.root}"
            )

        with self.store.lock(on_wait=waiting):
            self.store.clean_tmp()  # what a killed build left; no other build runs now
            check_writable(self.graph.order(targets), self.store.root)
            self.traces = self.store.load_traces(self.recipe.path)  # type: ignore[arg-type]
            try:
                if locked:
                    lockfile.check_inputs(self, targets)
                if getattr(executor, "parallel", False):  # it walks the DAG itself (Ray)
                    result = executor.make(self, targets)
                else:
                    result = self._make(targets, executor)
            finally:
                self.store.stat_cache.save()
            if self.write_lock:
                lockfile.update(self, result, locked)
            return result

    def _make(self, targets: list[str] | None, executor: Any) -> MakeResult:
        from graftbuild.steps import STEPS

        outputs: dict[str, str] = {}
        results: list[NodeResult] = []
        for node in self.graph.order(targets):
            trace = self.traces.get(node.id)
            if node.is_input:
                result = self.visit_input(node)
                outputs[node.id] = result.output_hash  # type: ignore[assignment]
                results.append(result)
                continue
            files = self._file_hashes(node)
            deps = {r: outputs[d] for r, d in node.deps.items()}
            step = STEPS[node.step]
            parts = key_parts(node, step.version, deps, files)
            digest = self._cached(node, parts.key)
            pulled = False
            if digest is None and self.remote is not None and self.remote.pull:
                digest = self.remote.fetch(parts.key, self.store, node.id)
                pulled = digest is not None
            if digest is None:
                reasons = explain(node, parts, trace)
                self.reporter.log(f"[bold]build[/] {node.id}: {'; '.join(reasons)}")
                with self.store.staging(node.id) as out:
                    ctx = StepContext(
                        node_id=node.id,
                        config=node.config,
                        inputs={
                            r: self._artifact_path(self.graph.node(d), outputs[d])
                            for r, d in node.deps.items()
                        },
                        input_hashes=deps,
                        files=dict(node.files),
                        out=out,
                        settings=self.settings,
                        progress=self.reporter,
                    )
                    executor.run(node.step, ctx)
                    digest = self.store.commit(out)
                self.store.record(parts.key, digest, node.id)
                if self.remote is not None and self.remote.push:
                    self.remote.push_node(parts.key, digest, self.store, node.id)
                action, state = "built", "stale"
            elif pulled:
                reasons, action, state = ["downloaded from the remote cache"], "pulled", "stale"
            else:
                reasons, action, state = [], "reused", "fresh"
            outputs[node.id] = digest
            why = (
                None
                if node.output is None
                else self.store.materialize(digest, node.output, node.id)
            )
            if why is not None and action == "reused":
                action, state = "restored", "stale"
                reasons = [f"output {why}: {node.output} (restored from the cache)"]
                if why != "missing":
                    self.reporter.log(f"[yellow]restore[/] {node.id}: output {why}: {node.output}")
            results.append(
                NodeResult(node.id, state, reasons, parts.key, digest, action, node.output)
            )
            self._save_trace(node, {"key": parts.key, "parts": parts.to_json(), "output": digest})
        return MakeResult(results, list(self.store.stat_cache.hashed))

    def visit_input(self, node: Node) -> NodeResult:
        """Hash a user's folder during make: "built" when its content differs from the last
        build's (it is what changed), else "reused"; records the trace."""
        trace = self.traces.get(node.id)
        digest, files = self._input_node(node)
        changed = trace is None or trace.get("output") != digest
        self._save_trace(node, {"output": digest, "files": files})
        return NodeResult(
            node.id,
            "stale" if changed else "fresh",
            explain_input(node, files, trace) if changed else [],
            output_hash=digest,
            action="built" if changed else "reused",
            output=node.path,
        )

    def _save_trace(self, node: Node, entry: dict[str, Any]) -> None:
        if self.traces.get(node.id) == entry:
            return
        self.traces[node.id] = entry
        self.store.save_traces(self.recipe.path, self.traces)  # type: ignore[arg-type]
