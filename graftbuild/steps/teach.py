"""``teach``: a teacher model answers the transfer prompts; its answers are the SFT data.

The teacher may have any architecture and tokenizer: only text leaves this step. It is loaded
here and nowhere else, and released before the step returns (training starts after).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from graftbuild.errors import UserError
from graftbuild.recipe import ids
from graftbuild.steps.base import Node, StepContext

if TYPE_CHECKING:
    from graftbuild.recipe import Recipe


class TeachStep:
    name: ClassVar[str] = "teach"
    version: ClassVar[int] = 1
    uses_accelerator: ClassVar[bool] = True

    def nodes(self, recipe: Recipe, out: Path) -> list[Node]:
        """``teach:NAME`` of every transfer: the teacher's answers to its prompts."""
        nodes = []
        for name, src in recipe.sources.items():
            t = src.transfer
            if t is None:
                continue
            teacher = recipe.teacher_node(name)
            nodes.append(
                Node(
                    ids.teach(name),
                    "teach",
                    config={"generation": t.generation.model_dump(mode="json"), "field": t.field},
                    deps={"teacher": teacher},
                    files={"prompts": t.prompts},
                    labels={
                        "file:prompts": f"prompts of '{name}' changed",
                        "config.generation": f"generation settings of '{name}' changed",
                        "config.field": f"prompt field of '{name}' changed",
                        "dep:teacher": f"teacher {teacher} changed",
                    },
                    output=out / "teach" / name,
                )
            )
        return nodes

    def run(self, ctx: StepContext) -> None:
        from graftbuild.weights.generation import (
            GENERATIONS_FILE,
            generate,
            render_prompt,
            write_generations,
        )
        from graftbuild.weights.modeling import load_causal_lm, load_tokenizer
        from graftbuild.weights.textdata import read_examples

        source = ctx.node_id.split(":", 1)[1]
        where = f"sources.{source}.transfer"
        gen, teacher_dir = ctx.config["generation"], ctx.inputs["teacher"]
        prompts = read_examples(ctx.files["prompts"], ctx.config["field"])
        try:
            tok = load_tokenizer(teacher_dir)
        except UserError as e:
            raise UserError(f"{where}.teacher: the teacher needs its own tokenizer: {e}") from None
        here = f"{where}.generation"
        texts = [render_prompt(tok, p, gen["chat_template"], here) for p in prompts]
        model = load_causal_lm(teacher_dir, ctx.placement)
        with ctx.progress.task(f"teach {ctx.node_id}", len(texts), unit="prompt") as advance:
            answers = generate(model, tok, texts, gen, ctx.placement, advance)
        del model
        gc.collect()
        rows = [
            {"prompt": p, "response": r, "sample": k}
            for p, rs in zip(prompts, answers, strict=True)
            for k, r in enumerate(rs)
        ]
        write_generations(ctx.out / GENERATIONS_FILE, rows)
