"""Node ids: the one place they are spelled. Users type them on the command line (``pack:code``),
plans and locks name nodes by them, and every node factory builds its ids from here.

An id is ``KIND`` or ``KIND:NAME``; ``kind_of`` and ``name_of`` take one apart.
"""

from __future__ import annotations

BASE = "base"
BASE_INIT = "base:init"
"""The base's seeded init, when the base is trained on text first."""


def node_id(kind: str, name: str) -> str:
    return f"{kind}:{name}"


def kind_of(node: str) -> str:
    return node.split(":", 1)[0]


def name_of(node: str) -> str:
    return node.split(":", 1)[-1]


def source(name: str) -> str:
    """A source model: a folder, or trained on text inside the build."""
    return node_id("source", name)


def teacher(name: str) -> str:
    return node_id("teacher", name)


def teacher_init(name: str) -> str:
    return node_id("teacher-init", name)


def teach(name: str) -> str:
    return node_id("teach", name)


def sft(name: str) -> str:
    return node_id("sft", name)


def dpo(name: str) -> str:
    return node_id("dpo", name)


def pack(name: str) -> str:
    return node_id("pack", name)


def graft(name: str) -> str:
    """base ⊕ a source's chain of packs (sources declared with a ``parent`` start from it)."""
    return node_id("graft", name)


def fuse(name: str) -> str:
    return node_id("fuse", name)


def eval_(name: str) -> str:
    return node_id("eval", name)


def release(name: str) -> str:
    return node_id("release", name)


def export(name: str) -> str:
    """An adapter of a pack for a serving target (``[[export]]``)."""
    return node_id("export", name)


def start(parent: str | None) -> str:
    """The model a source starts from: the base, or its parent's grafted model."""
    return BASE if parent is None else graft(parent)


def init_of(model: str) -> str:
    """The seeded-init node of a model declared like the base and trained on text."""
    return BASE_INIT if model == BASE else teacher_init(name_of(model))
