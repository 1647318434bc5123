"""What a step receives: its declared inputs, its config, and a fresh output folder.

A step is a pure function of exactly these: it reads only ``inputs`` and ``files`` and writes only
into ``out``. The scheduler hashes everything here into the node's key before calling it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from graftbuild.progress import NullReporter, Reporter


@dataclass(frozen=True)
class BuildSettings:
    """Execution settings: they change how fast a step runs, not (by design) what it produces."""

    device: str = "cpu"
    jobs: int = 1
    """Tensors processed at once inside a pack or fuse node (``-j``); never changes bytes."""

    @property
    def threads(self) -> int | None:
        """Formerly ``-j`` as torch threads; now None (torch's default). Kept so that steps
        still calling ``set_threads(ctx.settings.threads)`` work unchanged."""
        return None


@dataclass
class StepContext:
    node_id: str
    config: dict[str, Any]
    inputs: dict[str, Path]
    """Dependency role -> the upstream artifact's folder."""
    input_hashes: dict[str, str]
    """Dependency role -> the upstream artifact's content hash."""
    files: dict[str, Path]
    out: Path
    settings: BuildSettings = field(default_factory=BuildSettings)
    progress: Reporter = field(default_factory=NullReporter)


class Step(Protocol):
    name: ClassVar[str]
    version: ClassVar[int]
    """Bump when the step's output for the same inputs changes: every key using it changes."""

    def run(self, ctx: StepContext) -> None: ...
