"""What a build or a plan reports per node, and for the whole run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

State = Literal["fresh", "stale"]


@dataclass
class NodeResult:
    id: str
    state: State
    reasons: list[str] = field(default_factory=list)
    key: str | None = None
    output_hash: str | None = None
    action: str | None = None
    """"built", "reused", "restored" (re-materialised from the cache), "pulled" (downloaded from
    the remote cache), "failed" or "skipped" (an input failed); None in a plan for a node that
    would be built."""
    output: Path | None = None
    timing: dict[str, Any] | None = None
    """For a node built now: the step's start and end (wall clock), pid and host."""
    env: dict[str, Any] | None = None
    """For a node built now: the environment it was built in, measured where it ran."""

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
