"""The Ray runner: each node to build becomes a Ray task, so independent nodes (the packs) build
at the same time, on one machine or a cluster.

Only building moves to a task; the driver (this process, the engine) keeps keys, caches,
records, pushes and outputs. Artifacts pass between hosts through the cache: a worker reads its
inputs from the cache folder at the same path (a shared filesystem), or, with a remote cache
configured, downloads missing inputs from it by hash and uploads the object it built; the engine
then writes the action entry.

A task that dies with its worker is retried by Ray (``max_retries``); building twice is safe
because a node builds into a fresh staging folder that is renamed into the store only when
complete. A step that fails is not retried (it would fail again).

Ray is an optional extra (``pip install 'graftbuild[ray]'``) and imported only here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from graftbuild.build.runners.base import Job, Outcome, execute
from graftbuild.errors import BuildError, GraftbuildError, UserError


def run_on_worker(
    cache_root: str,
    job: Job,
    device: str,
    jobs: int,
    remote_url: str | None,
    push: bool,
    events: Any = None,
    interval: float = 10.0,
) -> Outcome:
    """Runs on a Ray worker: build one node into the cache (inputs another host built are
    downloaded from the remote first; the object is uploaded after). Its progress goes back to
    the driver through ``events`` (a Ray queue), as the driver's own would be shown."""
    from graftbuild.cache.remote import Remote
    from graftbuild.cache.store import Store
    from graftbuild.progress import NullReporter, RelayReporter
    from graftbuild.steps.base import BuildSettings

    reporter = NullReporter() if events is None else RelayReporter(events.put_nowait, interval)

    try:
        store = Store(Path(cache_root))
        remote = Remote(remote_url, strict=True) if remote_url else None
        for role, path in job.inputs.items():
            digest = job.input_hashes[role]
            cached = path == store.object_path(digest)
            missing = cached and remote is not None and not store.has_object(digest)
            if missing and not remote.download(digest, store, job.node_id):  # type: ignore[union-attr]
                raise BuildError(f"{job.node_id}: input {role} ({digest}) is in no cache here")
        outcome = execute(store, job, BuildSettings(device=device, jobs=jobs), reporter)
        if outcome.digest is not None and remote is not None and push:
            remote.upload_object(outcome.digest, store)
    except GraftbuildError as e:
        return Outcome(error=e)
    return outcome


class RayRunner:
    """``make --executor ray``: connects to ``address`` (or starts a local cluster on 127.0.0.1
    when none is given and Ray is not running in this process yet)."""

    name: ClassVar[str] = "ray"
    dry: ClassVar[bool] = False

    def __init__(self, address: str | None = None, max_retries: int = 3) -> None:
        self.address = address
        self.max_retries = max_retries
        self._inflight: dict[Any, Job] = {}
        self.timings: dict[str, dict[str, Any]] = {}
        """node id -> the task's start/end (wall clock), pid and host: for reports and tests."""

    def _ray(self) -> Any:
        try:
            import ray
        except ImportError:
            raise UserError("--executor ray needs Ray: pip install 'graftbuild[ray]'") from None
        if not ray.is_initialized():
            from graftbuild.weights.determinism import pinned_env_vars

            # workers load torch with the numerical paths the driver pinned
            runtime_env = {"env_vars": pinned_env_vars()}
            if self.address:
                ray.init(address=self.address, log_to_driver=False, runtime_env=runtime_env)
            else:
                ray.init(
                    _node_ip_address="127.0.0.1",
                    include_dashboard=False,
                    log_to_driver=False,
                    runtime_env=runtime_env,
                )
        return ray

    def open(self, store: Any, settings: Any, reporter: Any, remote: Any) -> None:
        self.ray = self._ray()
        self.task = self.ray.remote(run_on_worker)
        self.store, self.settings, self.remote = store, settings, remote
        self.reporter = reporter
        self.timings = {}
        self.events: Any = None
        if reporter.lines or reporter.bars or reporter.events is not None:
            from ray.util.queue import Queue

            # the workers' progress, shown by the driver as a local build's (progress.py)
            self.events = Queue(actor_options={"num_cpus": 0})

    def full(self) -> bool:
        return False  # Ray queues what the cluster cannot run yet

    def submit(self, job: Job) -> None:
        gpu = self.settings.device.startswith("cuda") and job.uses_accelerator
        remote = self.remote
        ref = self.task.options(
            num_cpus=self.settings.jobs,
            num_gpus=1 if gpu else 0,
            max_retries=self.max_retries,
            name=f"graftbuild:{job.node_id}",
        ).remote(
            str(self.store.root),
            job,
            self.settings.device,
            self.settings.jobs,
            remote.url if remote is not None else None,
            remote is not None and remote.push,
            self.events,
            self._interval(),
        )
        self._inflight[ref] = job

    def _interval(self) -> float:
        from graftbuild.progress import EVENTS_INTERVAL

        every = self.reporter.interval
        return min(every, EVENTS_INTERVAL) if self.reporter.events is not None else every

    def _relay(self) -> None:
        """Show what the workers reported since the last call."""
        if self.events is None:
            return
        from ray.util.queue import Empty

        while True:
            try:
                event = self.events.get_nowait()
            except Empty:
                return
            self.reporter.relay(event)

    def wait(self) -> list[tuple[Job, Outcome]]:
        done: list[Any] = []
        while not done:
            done, _ = self.ray.wait(list(self._inflight), num_returns=1, timeout=0.5)
            self._relay()
        out = []
        for ref in done:
            job = self._inflight.pop(ref)
            try:
                outcome = self.ray.get(ref)
            except Exception as e:  # the task's worker died more often than max_retries
                outcome = Outcome(error=BuildError(f"Ray task failed: {type(e).__name__}: {e}"))
            if outcome.timing and outcome.digest is not None:  # built (a failure has one too)
                self.timings[job.node_id] = outcome.timing
            out.append((job, outcome))
        return out

    def cancel(self) -> None:
        for ref in self._inflight:
            self.ray.cancel(ref)
        self._inflight.clear()

    def close(self) -> None:
        self._inflight.clear()
        if self.events is not None:
            self._relay()
            self.events.shutdown()
            self.events = None
