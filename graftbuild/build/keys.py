"""Keys: a node's key from its parts, and why a node is stale, in words.

Constructive traces: the key is xxh3-128 over the node's kind, its step and version, the
versions of the components it uses (codecs, strategy), its normalised config and the content
hashes of its inputs (upstream *outputs*, so an upstream
rebuild that reproduces the same bytes leaves this key unchanged: early cutoff). The last build's
parts are kept per node, so a changed key can be explained part by part.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from graftbuild.cache.hashing import hash_obj
from graftbuild.steps.base import Node


@dataclass(frozen=True)
class KeyParts:
    kind: str
    step: str
    """"pack@1": the step name and its algorithm version."""
    config: dict[str, str]
    """Top-level config field -> hash of its normalised value."""
    deps: dict[str, str]
    """Dependency role -> upstream output hash."""
    files: dict[str, str]
    """File role -> content hash."""
    components: dict[str, int] = field(default_factory=dict)
    """Component ("codec:mixed", "strategy:ties") -> its version."""

    @property
    def key(self) -> str:
        return hash_obj(self.to_json())

    def to_json(self) -> dict[str, Any]:
        """The parts as JSON. A node without components leaves the field out, so the keys of
        kinds that have none are what they were before components existed."""
        doc = asdict(self)
        if not doc["components"]:
            del doc["components"]
        return doc


def key_parts(
    node: Node, step_version: int, deps: dict[str, str], files: dict[str, str]
) -> KeyParts:
    return KeyParts(
        kind=node.kind,
        step=f"{node.step}@{step_version}",
        config={k: hash_obj(v) for k, v in sorted(node.config.items())},
        deps=dict(sorted(deps.items())),
        files=dict(sorted(files.items())),
        components=dict(sorted(node.components.items())),
    )


def explain(node: Node, parts: KeyParts, trace: dict[str, Any] | None) -> list[str]:
    """Why ``parts`` differ from the last build recorded in ``trace``, in words."""
    if not trace or "parts" not in trace:
        return ["never built"]
    old = trace["parts"]
    reasons: list[str] = []
    if old.get("step") != parts.step:
        reasons.append(f"step '{node.step}' changed ({old.get('step')} -> {parts.step})")
    before_c: dict[str, int] = old.get("components", {})
    for k in sorted(set(before_c) | set(parts.components)):
        was, now = before_c.get(k), parts.components.get(k)
        if was != now:
            kind, _, name = k.partition(":")
            reasons.append(
                f"{kind} '{name}' version {now} is now part of the key"
                if was is None
                else f"{kind} '{name}' changed (version {was} -> {now})"
            )
    for section, prefix in (("config", "config."), ("deps", "dep:"), ("files", "file:")):
        before: dict[str, str] = old.get(section, {})
        now: dict[str, str] = getattr(parts, section)
        for k in sorted(set(before) | set(now)):
            if before.get(k) != now.get(k):
                label = (
                    node.labels.get(prefix + k)
                    or f"{section[:-1] if section != 'config' else 'setting'} '{k}' changed"
                )
                if label not in reasons:
                    reasons.append(label)
    return reasons or ["output missing from the cache"]


def explain_input(node: Node, files: dict[str, str], trace: dict[str, Any] | None) -> list[str]:
    """Why an input folder counts as changed: which files differ from the last build."""
    if not trace or "files" not in trace:
        return ["never built"]
    before: dict[str, str] = trace["files"]
    changed = sorted(k for k in set(before) | set(files) if before.get(k) != files.get(k))
    label = node.labels.get("output", f"{node.id} changed")
    return [f"{label}: {', '.join(changed[:5])}{' …' if len(changed) > 5 else ''}"]
