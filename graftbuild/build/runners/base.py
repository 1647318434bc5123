"""The runner contract: the engine hands a runner the nodes to build; the runner builds them (or,
dry, does not) and reports each outcome. Runners know nothing of keys, caches' action entries,
traces or outputs: that is the engine's (build/engine.py).

``execute`` is what building one node means, wherever it runs: a fresh staging folder in the
cache, the step, the object committed. The local runner calls it in process; a Ray worker calls
it in its own process.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from graftbuild.errors import BuildError, GraftbuildError, describe_os_error

if TYPE_CHECKING:
    from graftbuild.cache.store import Store
    from graftbuild.progress import Reporter
    from graftbuild.steps.base import BuildSettings


@dataclass
class Job:
    """One node to build: everything its step reads, and nothing else."""

    node_id: str
    step: str
    config: dict[str, Any]
    inputs: dict[str, Path]
    """Dependency role -> the upstream artifact's folder."""
    input_hashes: dict[str, str]
    files: dict[str, Path]
    uses_accelerator: bool = False


@dataclass
class Outcome:
    digest: str | None = None
    """The built object's content hash (None: not built, a dry run)."""
    error: GraftbuildError | None = None
    timing: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] | None = None
    """The environment the node was built in, measured where it ran (the lock records it)."""


class Runner(Protocol):
    name: ClassVar[str]
    dry: ClassVar[bool]
    """A dry runner builds nothing; the engine then changes nothing either (``plan``)."""

    def open(self, store: Store, settings: BuildSettings, reporter: Reporter, remote: Any) -> None:
        """Called once before the first ``submit`` of a run."""
        ...

    def full(self) -> bool:
        """Whether another job may be submitted now (the runner's capacity)."""
        ...

    def submit(self, job: Job) -> None: ...

    def wait(self) -> list[tuple[Job, Outcome]]:
        """Blocks until at least one submitted job has finished; returns those that have."""
        ...

    def cancel(self) -> None:
        """Abandon every job still running (the build is stopping)."""
        ...

    def close(self) -> None: ...


def execute(store: Store, job: Job, settings: BuildSettings, progress: Reporter) -> Outcome:
    """Build ``job`` into ``store``: its step runs into a staging folder that is committed as an
    object only when complete. Failures come back as the outcome's error, naming the node. The
    timing holds what it cost: wall time, peak RSS (and GPU memory), bytes written."""
    from graftbuild.build.resources import measured, tree_bytes
    from graftbuild.steps.base import StepContext
    from graftbuild.weights.determinism import deterministic_math, environment, load_math

    # Every step's math runs under torch. "start" is when the job began on this worker;
    # "loaded" follows torch's one import per process, and a node's seconds count from there
    # (engine._took): its own work, not the ~1 s import of whichever node ran first.
    start = time.time()
    load_math()
    loaded = time.time()
    where = {"pid": os.getpid(), "host": socket.gethostname()}
    with progress.building(job.node_id), measured(settings.device) as cost:
        try:
            with store.staging(job.node_id) as out:
                ctx = StepContext(
                    node_id=job.node_id,
                    config=job.config,
                    inputs=dict(job.inputs),
                    input_hashes=dict(job.input_hashes),
                    files=dict(job.files),
                    out=out,
                    settings=settings,
                    progress=progress,
                )
                with deterministic_math(settings.device):
                    run_step(job.step, ctx)
                env = environment(settings.device)
                digest = store.commit(out)
        except GraftbuildError as e:
            error = e
        else:
            error = None
    timing = {"start": start, "loaded": loaded, "end": time.time(), **where, **cost}
    if error is not None:
        return Outcome(error=error, timing=timing)
    timing["bytes"] = tree_bytes(store.object_path(digest))
    return Outcome(digest=digest, timing=timing, env=env)


def run_step(step_name: str, ctx: Any) -> None:
    """A step's ``run``, with every failure turned into one of our errors naming the node."""
    from graftbuild.steps import STEPS

    try:
        STEPS[step_name].run(ctx)
    except GraftbuildError:
        raise
    except MemoryError:
        raise BuildError(f"{ctx.node_id}: out of memory") from None
    except OSError as e:
        raise BuildError(f"{ctx.node_id}: {describe_os_error(e)}") from e
    except Exception as e:
        raise BuildError(
            f"{ctx.node_id}: step '{step_name}' failed: {type(e).__name__}: {e}"
        ) from e
