"""``input``: a model folder the user provides (the base, a source, a teacher). Never built: its
output hash is the content hash of the folder, and the steps below read it in place."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from graftbuild.errors import BuildError
from graftbuild.recipe import ids
from graftbuild.steps.base import Node, StepContext, declared_models

if TYPE_CHECKING:
    from graftbuild.recipe import Recipe


class InputStep:
    name: ClassVar[str] = "input"
    version: ClassVar[int] = 0
    uses_accelerator: ClassVar[bool] = False

    def nodes(self, recipe: Recipe, out: Path) -> list[Node]:
        nodes = [
            Node(
                node,
                "input",
                path=spec.path,
                labels={"output": f"{what} model changed"},
                config=hub(spec),
            )
            for node, spec, _, what in declared_models(recipe, out)
            if spec.path is not None
        ]
        for name, src in recipe.sources.items():
            if src.path is not None:
                label = f"source '{name}' weights changed"
                node = Node(
                    ids.source(name),
                    "input",
                    path=src.path,
                    labels={"output": label},
                    config=hub(src),
                )
                nodes.append(node)
            elif src.transfer is not None and src.transfer.teacher not in recipe.teachers:
                nodes.append(
                    Node(
                        recipe.teacher_node(name),
                        "input",
                        path=recipe.teacher_path(name),
                        labels={"output": f"teacher of '{name}' changed"},
                    )
                )
        return nodes

    def run(self, ctx: StepContext) -> None:
        raise BuildError(f"{ctx.node_id}: an input folder is not built")


def hub(spec: Any) -> dict[str, str]:
    """For a model given by hub id: the id and the snapshot's commit, which the lock records
    (the folder's content hash is its identity either way)."""
    model = getattr(spec, "model", None)
    return {"hub": model, "revision": spec.revision} if model else {}
