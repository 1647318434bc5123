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
    seconds: float | None = None
    """Wall time this run spent on the node (its step when built; checking it when reused)."""
    bytes: int | None = None
    """Bytes this run wrote to the cache for it (built: the object; pulled: the download)."""

    def cost(self) -> dict[str, Any]:
        """The summary row: action, wall time, bytes written, peak RSS (and GPU memory)."""
        t = self.timing or {}
        return {
            "id": self.id,
            "action": self.action,
            "seconds": None if self.seconds is None else round(self.seconds, 3),
            "bytes": self.bytes,
            "peak_rss": t.get("peak_rss"),
            "peak_gpu": t.get("peak_gpu"),
            "host": t.get("host"),
            "output": str(self.output) if self.output else None,
        }

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

    @property
    def failed(self) -> list[str]:
        return self.ids("failed")

    def totals(self) -> dict[str, Any]:
        """Counts per action, total wall time of the nodes, bytes written, the highest peaks."""
        rows = [n.cost() for n in self.nodes]
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.action or "planned"] = counts.get(n.action or "planned", 0) + 1
        peaks = [r["peak_rss"] for r in rows if r["peak_rss"] is not None]
        gpus = [r["peak_gpu"] for r in rows if r["peak_gpu"] is not None]
        return {
            "nodes": len(rows),
            "actions": counts,
            "seconds": round(sum(r["seconds"] or 0.0 for r in rows), 3),
            "bytes": sum(r["bytes"] or 0 for r in rows),
            "peak_rss": max(peaks) if peaks else None,
            "peak_gpu": max(gpus) if gpus else None,
        }

    def node(self, node_id: str) -> NodeResult:
        return next(n for n in self.nodes if n.id == node_id)
