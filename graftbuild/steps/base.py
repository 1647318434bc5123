"""What a node kind is: its nodes, its step, and what a step receives.

A node kind is one module of ``graftbuild/steps/`` holding a Step: ``nodes(recipe, out)`` turns
the recipe into that kind's nodes (ids from ``graftbuild.recipe.ids``), and ``run(ctx)`` builds
one of them. A step is a pure function of its context: it reads only ``inputs`` and ``files`` and
writes only into ``out``. The engine hashes everything a node declares into its key before
calling the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from graftbuild.progress import NullReporter, Reporter
from graftbuild.recipe import ids

if TYPE_CHECKING:
    from graftbuild.recipe import Recipe
    from graftbuild.weights.placement import Placement


@dataclass
class Node:
    id: str
    step: str
    """Step name in ``graftbuild.steps.STEPS``; "input" for a folder the user provides."""
    config: dict[str, Any] = field(default_factory=dict)
    deps: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    """Key part -> the words that explain a change in it ("config.profile", "dep:source", ...)."""
    output: Path | None = None
    """Where the built artifact is materialised for the user (None: stays in the cache)."""
    path: Path | None = None
    """For an input node: the user's folder."""
    components: dict[str, int] = field(default_factory=dict)
    """Versions of the components whose code can change this node's bytes beyond its step's
    own ("codec:mixed", "strategy:ties"): part of its key, recorded in the lock."""

    @property
    def kind(self) -> str:
        return ids.kind_of(self.id)

    @property
    def name(self) -> str:
        return ids.name_of(self.id)

    @property
    def is_input(self) -> bool:
        return self.step == "input"


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
    placement_: Placement | None = None
    """Set to place tensors somewhere else than ``settings.device`` says (tests)."""

    @property
    def placement(self) -> Placement:
        """Where this step's tensors and models go (``--device``): the one owner of devices."""
        if self.placement_ is None:
            from graftbuild.weights.placement import Placement

            self.placement_ = Placement(self.settings.device)
        return self.placement_


class Step(Protocol):
    name: ClassVar[str]
    version: ClassVar[int]
    """Bump when the step's output for the same inputs changes: every key using it changes."""
    uses_accelerator: ClassVar[bool]
    """Runs on the GPU under ``--device cuda`` (a Ray task of it asks for one)."""

    def nodes(self, recipe: Recipe, out: Path) -> list[Node]:
        """This kind's nodes for ``recipe`` (``out``: the recipe's output folder)."""
        ...

    def run(self, ctx: StepContext) -> None: ...


def declared_models(recipe: Recipe, out: Path) -> list[tuple[str, Any, Path, str]]:
    """Models declared like the base (the base and every ``[teachers]`` entry): (node id, spec,
    output folder, how messages name it). Each is an input folder, a seeded init, or a seeded
    init trained on text; the input, init and sft kinds each take their part."""
    models = [(ids.BASE, recipe.base, out / "base", "base")]
    for name, spec in recipe.teachers.items():
        models.append((ids.teacher(name), spec, out / "teachers" / name, f"teacher '{name}'"))
    return models
