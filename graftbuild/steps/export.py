"""``export``: a pack as an adapter for a serving target (``[[export]]`` in a recipe), cached
and keyed like every node: rebuilt only when its pack (or chain), the base, its held-out data
or its settings change. The work is ``graftbuild.release.peft.export_adapter``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from graftbuild.recipe import ids
from graftbuild.skillpack.format import PACK_FILE
from graftbuild.steps.base import Node, StepContext

if TYPE_CHECKING:
    from graftbuild.recipe import ExportSpec, Recipe


def export_node(recipe: Recipe, x: ExportSpec, out: Path) -> Node:
    from graftbuild.errors import UserError
    from graftbuild.release.targets import get_target

    try:
        get_target(x.target).cap(x.max_rank)  # a rank beyond the server's limit: exit 2 now
    except UserError as e:
        raise UserError(f"{recipe.path}: export {x.name!r}: max_rank: {e}") from None
    chain = recipe.chain(x.pack)
    data = x.data or next((e.data[x.pack] for e in recipe.eval if x.pack in e.data), None)
    config = x.model_dump(mode="json", exclude={"name", "data", "output"})
    config["chain"] = chain
    return Node(
        ids.export(x.name),
        "export",
        config=config,
        deps={"base": ids.BASE} | {f"pack.{i}": ids.pack(p) for i, p in enumerate(chain)},
        files={"data": data} if data is not None else {},
        labels={"dep:base": "base model changed", "file:data": "held-out data changed"}
        | {f"dep:pack.{i}": f"pack '{p}' changed" for i, p in enumerate(chain)}
        | {f"config.{k}": f"export {k} changed" for k in config},
        output=x.output or out / "exports" / x.name,
    )


class ExportStep:
    name: ClassVar[str] = "export"
    version: ClassVar[int] = 1
    uses_accelerator: ClassVar[bool] = False

    def nodes(self, recipe: Recipe, out: Path) -> list[Node]:
        return [export_node(recipe, x, out) for x in recipe.export]

    def run(self, ctx: StepContext) -> None:
        from graftbuild.release.peft import export_adapter

        cfg = ctx.config
        chain = cfg["chain"]
        layers = [(ctx.inputs[f"pack.{i}"] / PACK_FILE, 1.0) for i in range(len(chain))]
        provenance = {
            "packs": [
                {"name": p, "hash": ctx.input_hashes[f"pack.{i}"], "weight": 1.0}
                for i, p in enumerate(chain)
            ],
            "base": ctx.input_hashes["base"],
        }
        export_adapter(
            layers,
            ctx.out,
            base=ctx.inputs["base"],
            target=cfg["target"],
            max_rank=cfg["max_rank"],
            tolerance=cfg["tolerance"],
            max_error=cfg["max_error"],
            extras=cfg["extras"],
            dtype=cfg["dtype"],
            base_model=cfg["base_model"],
            data=ctx.files.get("data"),
            samples=cfg["samples"],
            provenance=provenance,
            sources=[ctx.inputs.get(f"pack.{i}.source") for i in range(len(chain))],
        )
