"""The Ray executor: each stale node becomes a Ray task as soon as its inputs are known.

The driver (this process) keeps the scheduler's job: it walks the DAG, computes keys, asks the
local and remote caches, records actions, pushes, and materialises outputs. Only running a
step moves to a task. Artifacts pass between hosts through the cache: a worker reads its inputs
from the cache folder at the same path (a shared filesystem), or, with a remote cache
configured, downloads missing inputs from it by hash and uploads the object it built; the
driver then writes the action entry.

A task that dies with its worker is retried by Ray (``max_retries``); steps are safe to run
twice because a step writes into a fresh staging folder that is renamed into the store only
when complete. A step that fails is not retried (it would fail again): the build stops, or with
``keep_going`` every node that does not depend on a failed one is still built.

Ray is an optional extra (``pip install 'graftbuild[ray]'``) and imported only here.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graftbuild.errors import BuildError, GraftbuildError, UserError

if TYPE_CHECKING:
    from graftbuild.scheduler import MakeResult, Scheduler

GPU_STEPS = {"sft", "teach", "dpo", "pack", "fuse", "eval", "init"}
"""Steps that run on the accelerator when ``--device cuda``: each task asks Ray for one GPU."""


def run_step(
    cache_root: str,
    step_name: str,
    node_id: str,
    config: dict[str, Any],
    inputs: dict[str, str],
    input_hashes: dict[str, str],
    files: dict[str, str],
    device: str,
    threads: int | None,
    remote_url: str | None,
    push: bool,
) -> dict[str, Any]:
    """Runs on a Ray worker: build one node into the cache; returns its digest and timings."""
    from graftbuild.executors.local import LocalExecutor
    from graftbuild.remote import Remote
    from graftbuild.steps.base import BuildSettings, StepContext
    from graftbuild.store import Store

    start = time.time()
    try:
        store = Store(Path(cache_root))
        remote = Remote(remote_url, strict=True) if remote_url else None
        for role, path in inputs.items():  # artifacts another host built: from the remote
            digest = input_hashes[role]
            cached = path == str(store.object_path(digest))
            missing = cached and remote is not None and not store.has_object(digest)
            if missing and not remote.download(digest, store, node_id):  # type: ignore[union-attr]
                raise BuildError(f"{node_id}: input {role} ({digest}) is in no cache here")
        with store.staging(node_id) as out:
            ctx = StepContext(
                node_id=node_id,
                config=config,
                inputs={r: Path(p) for r, p in inputs.items()},
                input_hashes=input_hashes,
                files={r: Path(p) for r, p in files.items()},
                out=out,
                settings=BuildSettings(device=device, jobs=threads or 1),
            )
            LocalExecutor().run(step_name, ctx)
            digest = store.commit(out)
        if remote is not None and push:
            remote.upload_object(digest, store)
    except GraftbuildError as e:
        return {"ok": False, "error": str(e), "user": isinstance(e, UserError)}
    return {
        "ok": True,
        "digest": digest,
        "start": start,
        "end": time.time(),
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }


class RayExecutor:
    """``make --executor ray``: connects to ``address`` (or starts a local cluster on 127.0.0.1
    when none is given and Ray is not running in this process yet)."""

    name = "ray"
    parallel = True

    def __init__(
        self, address: str | None = None, keep_going: bool = False, max_retries: int = 3
    ) -> None:
        self.address = address
        self.keep_going = keep_going
        self.max_retries = max_retries
        self.timings: dict[str, dict[str, Any]] = {}
        """node id -> the task's start/end (wall clock), pid and host: for reports and tests."""

    def _ray(self) -> Any:
        try:
            import ray
        except ImportError:
            raise UserError("--executor ray needs Ray: pip install 'graftbuild[ray]'") from None
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:
                ray.init(
                    _node_ip_address="127.0.0.1",
                    include_dashboard=False,
                    log_to_driver=False,
                )
        return ray

    def make(self, sched: Scheduler, targets: list[str] | None) -> MakeResult:
        from graftbuild.rebuilder import explain, key_parts
        from graftbuild.scheduler import MakeResult, NodeResult
        from graftbuild.steps import STEPS

        ray = self._ray()
        task = ray.remote(run_step)
        settings, store, remote, log = sched.settings, sched.store, sched.remote, sched.reporter.log
        gpu = settings.device.startswith("cuda")
        order = sched.graph.order(targets)
        outputs: dict[str, str] = {}
        results: dict[str, NodeResult] = {}
        dead: set[str] = set()  # failed, or below a failed node
        errors: list[str] = []
        inflight: dict[Any, tuple[Any, Any, list[str]]] = {}
        pending = list(order)

        def finish(node: Any, parts: Any, digest: str, action: str, reasons: list[str]) -> None:
            outputs[node.id] = digest
            restored = node.output is not None and store.materialize(digest, node.output, node.id)
            state = "fresh" if action == "reused" else "stale"
            if restored and action == "reused":
                action, state = "restored", "stale"
                reasons = [f"output missing: {node.output} (restored from the cache)"]
            results[node.id] = NodeResult(
                node.id, state, reasons, parts.key, digest, action, node.output
            )
            entry = {"key": parts.key, "parts": parts.to_json(), "output": digest}
            sched._save_trace(node, entry)

        def start(node: Any) -> None:
            trace = sched.traces.get(node.id)
            if node.is_input:
                results[node.id] = sched.visit_input(node)
                outputs[node.id] = results[node.id].output_hash
                return
            files = sched._file_hashes(node)
            deps = {r: outputs[d] for r, d in node.deps.items()}
            parts = key_parts(node, STEPS[node.step].version, deps, files)
            digest = sched._cached(node, parts.key)
            if digest is None and remote is not None and remote.pull:
                digest = remote.fetch(parts.key, store, node.id)
                if digest is not None:
                    finish(node, parts, digest, "pulled", ["downloaded from the remote cache"])
                    return
            if digest is not None:
                finish(node, parts, digest, "reused", [])
                return
            reasons = explain(node, parts, trace)
            log(f"[bold]submit[/] {node.id}: {'; '.join(reasons)}")
            inputs = {
                r: str(sched._artifact_path(sched.graph.node(d), outputs[d]))
                for r, d in node.deps.items()
            }
            ref = task.options(
                num_cpus=settings.jobs,
                num_gpus=1 if gpu and node.step in GPU_STEPS else 0,
                max_retries=self.max_retries,
                name=f"graftbuild:{node.id}",
            ).remote(
                str(store.root),
                node.step,
                node.id,
                node.config,
                inputs,
                deps,
                {r: str(p) for r, p in node.files.items()},
                settings.device,
                settings.jobs,
                remote.url if remote is not None else None,
                remote is not None and remote.push,
            )
            inflight[ref] = (node, parts, reasons)

        def fail(node_id: str, message: str) -> None:
            errors.append(f"{node_id}: {message}")
            dead.add(node_id)
            log(f"[red]failed[/] {node_id}: {message}")

        while pending or inflight:
            progressed = True
            while progressed and not (errors and not self.keep_going):
                progressed = False
                for node in list(pending):
                    if any(d in dead for d in node.deps.values()):
                        pending.remove(node)
                        dead.add(node.id)
                        results[node.id] = NodeResult(
                            node.id, "stale", ["an input failed to build"], action="skipped"
                        )
                        progressed = True
                    elif all(d in outputs for d in node.deps.values()):
                        pending.remove(node)
                        start(node)
                        progressed = True
            if errors and not self.keep_going:
                for ref in inflight:
                    ray.cancel(ref)
                break
            if not inflight:
                break
            done, _ = ray.wait(list(inflight), num_returns=1)
            for ref in done:
                node, parts, reasons = inflight.pop(ref)
                try:
                    res = ray.get(ref)
                except Exception as e:  # the task's worker died more often than max_retries
                    fail(node.id, f"Ray task failed: {type(e).__name__}: {e}")
                    continue
                if not res["ok"]:
                    fail(node.id, res["error"])
                    continue
                self.timings[node.id] = {k: res[k] for k in ("start", "end", "pid", "host")}
                log(
                    f"[bold]built[/] {node.id} on {res['host']} in {res['end'] - res['start']:.1f}s"
                )
                store.record(parts.key, res["digest"], node.id)
                if remote is not None and remote.push:
                    remote.push_node(parts.key, res["digest"], store, node.id)
                finish(node, parts, res["digest"], "built", reasons)
        if errors:
            raise BuildError("; ".join(errors))
        return MakeResult(
            [results[n.id] for n in order if n.id in results], list(store.stat_cache.hashed)
        )
