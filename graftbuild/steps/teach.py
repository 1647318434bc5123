"""``teach``: a teacher model answers the transfer prompts; its answers are the SFT data.

The teacher may have any architecture and tokenizer: only text leaves this step. It is loaded
here and nowhere else, and released before the step returns (training starts after).
"""

from __future__ import annotations

import gc
from typing import ClassVar

from graftbuild.errors import UserError
from graftbuild.steps.base import StepContext


class TeachStep:
    name: ClassVar[str] = "teach"
    version: ClassVar[int] = 1

    def run(self, ctx: StepContext) -> None:
        from graftbuild.generation import (
            GENERATIONS_FILE,
            generate,
            render_prompt,
            write_generations,
        )
        from graftbuild.modeling import load_causal_lm, load_tokenizer
        from graftbuild.textdata import read_examples

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
        model = load_causal_lm(teacher_dir, ctx.settings.device)
        with ctx.progress.task(f"teach {ctx.node_id}", len(texts)) as advance:
            answers = generate(model, tok, texts, gen, ctx.settings.device, advance)
        del model
        gc.collect()
        rows = [
            {"prompt": p, "response": r, "sample": k}
            for p, rs in zip(prompts, answers, strict=True)
            for k, r in enumerate(rs)
        ]
        write_generations(ctx.out / GENERATIONS_FILE, rows)
