"""The engine: one node visit and one loop, for ``plan``, ``make`` on any runner, and ``verify``.

``visit(node)`` decides what a node needs, from its key (build/keys.py) and the caches: *fresh*
(its object is cached and intact), *pulled* (downloaded from the remote cache) or *stale*, with
the reasons in words. ``finish`` records what happened: the action entry, the push, the output
folder (re-materialised when it is missing or altered: "restored") and the trace that explains
the next plan. ``run`` is the ready-queue loop: a node is visited once every node it depends on
has finished; stale nodes go to the runner, which builds as many at once as its capacity allows
(local: one; Ray: the cluster's), and a finished build lets the nodes below it go.

Runners differ only in how they build. The dry runner builds nothing, and the engine then
changes nothing (no discard, record, push, output or trace): that is ``plan``. A node below a
stale one is then reported stale with its own reasons, since its inputs are not known yet (it
may still be reused through early cutoff when ``make`` runs).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from graftbuild.build.graph import BuildGraph, Node, build_graph
from graftbuild.build.keys import KeyParts, explain, explain_input, key_parts
from graftbuild.build.pathcheck import check_overlaps, check_writable
from graftbuild.build.resources import tree_bytes
from graftbuild.build.results import MakeResult, NodeResult
from graftbuild.build.runners.base import Job, Outcome, Runner
from graftbuild.errors import BuildError, GraftbuildError, UserError, named
from graftbuild.progress import NullReporter, Reporter
from graftbuild.recipe import Recipe
from graftbuild.steps import STEPS
from graftbuild.steps.base import BuildSettings

if TYPE_CHECKING:
    from graftbuild.cache.remote import Remote
    from graftbuild.cache.store import Store

__all__ = ["Engine", "MakeResult", "NodeResult", "Visit", "cache_dir"]


def cache_dir(recipe: Recipe, override: Path | None = None) -> Path:
    if override is not None:
        return override
    env = os.environ.get("GRAFTBUILD_CACHE")
    if env:
        return Path(env)
    return recipe.project.cache or recipe.root / "cache"


def restore_reason(node: Node, why: str) -> str:
    """Why a cached node's output folder is written again (no rebuild)."""
    return f"output {why}: {node.output} (restored from the cache)"


def corrupt_reason(problem: str) -> str:
    return f"cached object corrupt ({problem}); rebuilt"


def upstream_reason(dep: str) -> str:
    return f"{dep} is stale (reused if it rebuilds to the same bytes)"


@dataclass
class Visit:
    """What a node needs, decided before anything is built."""

    node: Node
    state: Literal["fresh", "pulled", "stale"]
    reasons: list[str] = field(default_factory=list)
    parts: KeyParts | None = None
    """None for an input folder, and for a node whose inputs are not known yet (a plan)."""
    digest: str | None = None
    """The output hash, when known without building (fresh, pulled, an input folder)."""
    files: dict[str, str] | None = None
    """An input folder's per-file hashes."""
    corrupt: str | None = None
    """The cached object's problem, when it was found corrupt (make discards it)."""

    @property
    def key(self) -> str | None:
        return None if self.parts is None else self.parts.key

    @property
    def needs_build(self) -> bool:
        return self.state == "stale" and self.parts is not None and not self.node.is_input


class Engine:
    def __init__(
        self,
        recipe: Recipe,
        store: Store,
        settings: BuildSettings | None = None,
        reporter: Reporter | None = None,
        remote: Remote | None = None,
        outputs: bool = True,
    ) -> None:
        self.recipe = recipe
        self.graph: BuildGraph = build_graph(recipe)
        self.store = store
        check_overlaps(self.graph, store.root)
        self.settings = settings or BuildSettings()
        self.reporter = reporter or NullReporter()
        self.remote = remote
        """Asked only on a local miss (pull), told about each build (push)."""
        self.outputs = outputs
        """False: materialise nothing and leave the recipe's lockfile alone (``verify``)."""
        assert recipe.path is not None
        self.traces = store.load_traces(recipe.path)
        self._dry = False

    # -- entry points ---------------------------------------------------------------------------

    def plan(self, targets: list[str] | None = None) -> list[NodeResult]:
        """Every node fresh or stale, with reasons; builds and changes nothing."""
        from graftbuild.build.runners.dry import DryRunner

        return self.run(targets, DryRunner()).nodes

    def make(
        self,
        targets: list[str] | None = None,
        runner: Runner | None = None,
        locked: bool = False,
        keep_going: bool = False,
    ) -> MakeResult:
        """Build under the cache's lock; then write the recipe's lockfile (``locked``: check
        against it instead)."""
        from graftbuild.build import lockfile
        from graftbuild.build.runners.local import LocalRunner
        from graftbuild.cache.store import owned

        def waiting(pid: str) -> None:
            self.reporter.log(
                f"waiting for another graftbuild build (pid {pid}) using {self.store.root}"
            )

        with self.store.lock(on_wait=waiting):
            self.store.clean_tmp()  # what a killed build left; no other build runs now
            if self.outputs:
                check_writable(self.graph.order(targets), self.store.root)
                for node in self.graph.order(targets):  # before any work, not after packing
                    if node.output is not None:
                        owned(node.output)
            self.traces = self.store.load_traces(self.recipe.path)  # type: ignore[arg-type]
            try:
                if locked:
                    lockfile.check_inputs(self, targets)
                result = self.run(targets, runner or LocalRunner(), keep_going)
            finally:
                self.store.stat_cache.save()
            if self.outputs:
                lockfile.update(self, result, locked)
            return result

    # -- the loop -------------------------------------------------------------------------------

    def run(
        self, targets: list[str] | None, runner: Runner, keep_going: bool = False
    ) -> MakeResult:
        """Visit every node of ``targets`` (default: all) once its inputs are known, hand the
        stale ones to ``runner``, finish each. With ``keep_going`` a failure stops only the nodes
        below it; otherwise nothing new starts and the first failure is raised."""
        order = self.graph.order(targets)
        pending = list(order)
        outputs: dict[str, str | None] = {}
        results: dict[str, NodeResult] = {}
        building: dict[str, Visit] = {}
        failures: list[tuple[str, GraftbuildError]] = []
        failed: set[str] = set()  # failed, or below a failed node
        self._dry = runner.dry
        if not self._dry:
            self.reporter.event("plan", nodes=[n.id for n in order])
        runner.open(self.store, self.settings, self.reporter, self.remote)
        try:
            while True:
                stopping = bool(failures) and not keep_going
                started = False
                for node in [] if stopping else list(pending):
                    if any(d in failed for d in node.deps.values()):
                        pending.remove(node)
                        failed.add(node.id)
                        results[node.id] = NodeResult(
                            node.id, "stale", ["an input failed to build"], action="skipped"
                        )
                        if not self._dry:
                            self.reporter.event("skipped", node=node.id)
                        continue
                    if not all(d in outputs for d in node.deps.values()):
                        continue
                    if runner.full():
                        break
                    pending.remove(node)
                    started = True
                    began = time.monotonic()
                    try:
                        visit = self.visit(node, outputs)
                        if visit.needs_build:
                            building[node.id] = visit
                            runner.submit(self._job(visit, outputs))
                        else:
                            results[node.id] = self.finish(visit, outputs, began=began)
                    except GraftbuildError as e:
                        # a user error found visiting this node (its input folder, a file):
                        # the message names the node
                        err = named(node.id, e)
                        results[node.id] = NodeResult(node.id, "stale", [str(err)], action="failed")
                        if not self._dry:
                            self.reporter.event(
                                "failed", node=node.id, exit_code=err.exit_code, message=str(err)
                            )
                        err.result = self._result(order, results)
                        raise err from None
                if not building:
                    if stopping or not pending or not started:
                        break
                    continue
                if stopping:
                    runner.cancel()
                    break
                for job, outcome in runner.wait():
                    visit = building.pop(job.node_id)
                    if outcome.error is not None:
                        error = named(job.node_id, outcome.error)
                        failures.append((job.node_id, error))
                        failed.add(job.node_id)
                        self.reporter.log(f"[red]failed[/] {job.node_id}: {outcome.error}")
                        results[job.node_id] = NodeResult(
                            job.node_id,
                            "stale",
                            visit.reasons,
                            visit.key,
                            action="failed",
                            timing=outcome.timing or None,
                            seconds=_took(outcome.timing),
                        )
                        self.reporter.event(
                            "failed",
                            exit_code=error.exit_code,
                            message=str(error),
                            **node_event(results[job.node_id]),
                        )
                    else:
                        results[job.node_id] = self.finish(visit, outputs, outcome)
        finally:
            runner.close()
            self._dry = False
        if failures:
            error = failures[0][1]
            if len(failures) > 1:
                error = BuildError("; ".join(str(e) for _, e in failures))
            error.node = failures[0][0]
            error.result = self._result(order, results)
            raise error
        return self._result(order, results)

    def _result(self, order: list[Node], results: dict[str, NodeResult]) -> MakeResult:
        return MakeResult(
            [results[n.id] for n in order if n.id in results], list(self.store.stat_cache.hashed)
        )

    # -- one node -------------------------------------------------------------------------------

    def visit(self, node: Node, outputs: dict[str, str | None]) -> Visit:
        """What ``node`` needs, given the output hashes of the nodes it depends on (None: not
        known, they are stale in a plan)."""
        trace = self.traces.get(node.id)
        if node.is_input:
            digest, files = self._input_folder(node)
            same = trace is not None and trace.get("output") == digest
            reasons = [] if same else explain_input(node, files, trace)
            return Visit(node, "fresh" if same else "stale", reasons, digest=digest, files=files)
        files_hashed = self._file_hashes(node)
        unknown = [d for d in node.deps.values() if outputs.get(d) is None]
        if unknown:
            known = {r: outputs.get(d) or "?" for r, d in node.deps.items()}
            parts = key_parts(node, STEPS[node.step].version, known, files_hashed)
            changed = {node.labels.get(f"dep:{r}") for r, d in node.deps.items() if d in unknown}
            direct = [
                r
                for r in explain(node, parts, trace)
                if r != "output missing from the cache" and r not in changed
            ]
            return Visit(node, "stale", direct + [upstream_reason(d) for d in unknown])
        deps = {r: outputs[d] for r, d in node.deps.items()}
        parts = key_parts(node, STEPS[node.step].version, deps, files_hashed)  # type: ignore[arg-type]
        digest = self.store.lookup(parts.key)
        problem = None if digest is None else self.store.verify(digest)
        if digest is not None and problem is None:
            return Visit(node, "fresh", parts=parts, digest=digest)
        if problem is not None:
            return Visit(node, "stale", [corrupt_reason(problem)], parts, corrupt=problem)
        if self.remote is not None and self.remote.pull and not self._dry:
            pulled = self.remote.fetch(parts.key, self.store, node.id)
            if pulled is not None:
                return Visit(node, "pulled", ["downloaded from the remote cache"], parts, pulled)
        return Visit(node, "stale", explain(node, parts, trace), parts)

    def finish(
        self,
        visit: Visit,
        outputs: dict[str, str | None],
        outcome: Outcome | None = None,
        began: float | None = None,
    ) -> NodeResult:
        """Record what happened to a visited node; returns its result. ``began``: when its
        visit started (the wall time of a node not built)."""

        def spent() -> float | None:
            return None if began is None else time.monotonic() - began

        node, effects = visit.node, not self._dry
        if node.is_input:
            outputs[node.id] = visit.digest
            if effects:
                self._save_trace(node, {"output": visit.digest, "files": visit.files})
            changed = visit.state == "stale"
            result = NodeResult(
                node.id,
                visit.state,  # type: ignore[arg-type]
                visit.reasons,
                output_hash=visit.digest,
                action="built" if changed else "reused",
                output=node.path,
                seconds=spent(),
                bytes=0,
            )
            if effects:
                self.reporter.event("finished", **node_event(result))
            return result
        digest = outcome.digest if outcome is not None else visit.digest
        outputs[node.id] = digest
        if digest is None:  # not built: a plan
            return NodeResult(node.id, "stale", visit.reasons, visit.key)
        assert visit.parts is not None
        action = {"fresh": "reused", "pulled": "pulled", "stale": "built"}[visit.state]
        if action == "pulled" and effects:
            self.reporter.event("pulled", node=node.id, object=digest)
        if action == "built" and effects:
            self.store.record(visit.parts.key, digest, node.id)
            if self.remote is not None and self.remote.push:
                self.remote.push_node(visit.parts.key, digest, self.store, node.id)
                self.reporter.event("pushed", node=node.id, object=digest)
            timing = outcome.timing if outcome is not None else {}
            if timing:
                where = f" on {timing['host']}" if timing.get("host") else ""
                took = _took(timing)
                self.reporter.log(f"[bold]built[/] {node.id}{where} in {took:.1f}s")
        state, reasons = ("fresh" if action == "reused" else "stale"), visit.reasons
        why = self._place_output(node, digest)
        if why is not None and action == "reused":
            action, state, reasons = "restored", "stale", [restore_reason(node, why)]
            if why != "missing" and effects:
                self.reporter.log(f"[yellow]restore[/] {node.id}: output {why}: {node.output}")
        if effects:
            entry = {"key": visit.parts.key, "parts": visit.parts.to_json(), "output": digest}
            self._save_trace(node, entry)
        timing = outcome.timing if outcome is not None and outcome.timing else None
        written = 0
        if action == "built":
            written = (timing or {}).get("bytes", 0)
        elif action == "pulled" and effects:
            written = tree_bytes(self.store.object_path(digest))
        result = NodeResult(
            node.id,
            state,  # type: ignore[arg-type]
            reasons,
            visit.parts.key,
            digest,
            action,
            node.output,
            timing=timing,
            env=outcome.env if outcome is not None else None,
            seconds=_took(timing) if timing else spent(),
            bytes=written,
        )
        if effects:
            self.reporter.event("finished", **node_event(result))
        return result

    # -- helpers --------------------------------------------------------------------------------

    def _job(self, visit: Visit, outputs: dict[str, str | None]) -> Job:
        node = visit.node
        if visit.corrupt is not None and not self._dry:
            digest = self.store.lookup(visit.parts.key)  # type: ignore[union-attr]
            self.reporter.log(
                f"[red]corrupt[/] cached object of {node.id}: "
                f"{self.store.object_path(digest or '')}: {visit.corrupt}; removed, "
                f"{node.id} will be rebuilt"
            )
            if digest is not None:
                self.store.discard(digest)
        if not self._dry:
            self.reporter.log(f"[bold]build[/] {node.id}: {'; '.join(visit.reasons)}")
            self.reporter.event("started", node=node.id, step=node.step, reasons=visit.reasons)
        inputs, hashes = self.job_inputs(node, outputs)
        return Job(
            node_id=node.id,
            step=node.step,
            config=node.config,
            inputs=inputs,
            input_hashes=hashes,  # type: ignore[arg-type]
            files=dict(node.files),
            uses_accelerator=STEPS[node.step].uses_accelerator,
        )

    def job_inputs(
        self, node: Node, outputs: dict[str, str | None]
    ) -> tuple[dict[str, Path], dict[str, str]]:
        """(role -> folder, role -> content hash) a node's step reads: its dependencies, and what
        their steps forward (a reference pack's source, as ``pack.0.source``), which is read by
        this node but not part of its key (the dependency's own bytes name it by hash)."""
        hashes: dict[str, str] = {r: outputs[d] for r, d in node.deps.items()}  # type: ignore[misc]
        inputs = {r: self.artifact_path(d, hashes[r]) for r, d in node.deps.items()}
        for r, d in node.deps.items():
            upstream = self.graph.node(d)
            for inner in getattr(STEPS.get(upstream.step), "forwards", ()):
                dd = upstream.deps.get(inner)
                if dd is not None and outputs.get(dd) is not None:
                    hashes[f"{r}.{inner}"] = outputs[dd]  # type: ignore[assignment]
                    inputs[f"{r}.{inner}"] = self.artifact_path(dd, outputs[dd])  # type: ignore[arg-type]
        return inputs, hashes

    def artifact_path(self, node_id: str, digest: str) -> Path:
        """Where a built (or input) node's artifact is read from."""
        node = self.graph.node(node_id)
        return node.path if node.is_input else self.store.object_path(digest)  # type: ignore[return-value]

    def _place_output(self, node: Node, digest: str) -> str | None:
        """Why the node's output folder did not hold its object (None: it did). Make writes it
        again; a plan only looks."""
        if node.output is None or not self.outputs:
            return None
        if self._dry:
            return self.store.output_problem(digest, node.output)
        return self.store.materialize(digest, node.output, node.id)

    def _input_folder(self, node: Node) -> tuple[str, dict[str, str]]:
        from graftbuild.weights.tensors import check_weight_files

        assert node.path is not None
        if not node.path.is_dir():
            raise UserError(
                f"{self.recipe.path}: {node.id}: expected a model folder, not found: {node.path}"
            )
        check_weight_files(node.path)  # refuse pickles, empty folders, truncated files
        th = self.store.stat_cache.tree(node.path)
        return th.digest, th.files

    def _file_hashes(self, node: Node) -> dict[str, str]:
        out = {}
        for role, path in node.files.items():
            if not path.exists():
                raise UserError(f"{self.recipe.path}: {node.id} {role}: path not found: {path}")
            out[role] = self.store.stat_cache.input_hash(path).digest
        return out

    def _save_trace(self, node: Node, entry: dict[str, Any]) -> None:
        if self.traces.get(node.id) == entry:
            return
        self.traces[node.id] = entry
        self.store.save_traces(self.recipe.path, self.traces)  # type: ignore[arg-type]


def node_event(result: NodeResult) -> dict[str, Any]:
    """A node's summary row as an event's fields: ``node`` names it, as in every node event."""
    row = result.cost()
    return {"node": row.pop("id"), **row}


def _took(timing: dict[str, Any] | None) -> float | None:
    """A node's own seconds: from the worker's math stack being loaded to the end."""
    if not timing or "end" not in timing:
        return None
    return float(timing["end"] - timing.get("loaded", timing["start"]))
