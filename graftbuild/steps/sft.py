"""``sft``: supervised fine-tuning through TRL's SFTTrainer, one step for two kinds of data.

* ``text``: a text file (a base or a source's ``finetune``), tokenized, joined by eos and cut
  into sequences of ``seq_len`` tokens; the loss covers every token.
* ``pairs``: a teacher's answers (the ``teach`` node of a ``transfer``); each example is the
  prompt (optionally in the target's chat template) and the response, loss on the response only.

The output is the trained model in the starting model's tensor layout, with its config and
tokenizer, so the pack step pairs it with the base tensor by tensor.
"""

from __future__ import annotations

from typing import ClassVar

from graftbuild.steps.base import StepContext


class SftStep:
    name: ClassVar[str] = "sft"
    version: ClassVar[int] = 1

    def run(self, ctx: StepContext) -> None:
        from graftbuild.modeling import load_causal_lm, load_tokenizer
        from graftbuild.training import fit, quiet_training, require_trl, save_like_base

        require_trl()  # before any work: a missing extra is the user's to fix
        train, data = ctx.config["train"], ctx.config["data"]
        base_dir = ctx.inputs["base"]
        with quiet_training():
            tok = load_tokenizer(base_dir)
            if data["kind"] == "text":
                rows, max_length = self._text_rows(ctx, tok, data), data["seq_len"]
            else:
                rows, max_length = self._pair_rows(ctx, tok, data), data["max_len"]
            model = load_causal_lm(base_dir, ctx.settings.device)
            model = fit(ctx, "SFT", model, tok, rows, train, max_length=max_length, packing=False)
            save_like_base(model, base_dir, ctx.out, ctx.node_id)

    @staticmethod
    def _text_rows(ctx: StepContext, tok: object, data: dict) -> list[dict]:
        from graftbuild.textdata import read_examples, token_chunks

        path = ctx.files["data"]
        chunks = token_chunks(tok, read_examples(path, data["field"]), data["seq_len"], path)
        return [{"input_ids": row} for row in chunks.tolist()]

    @staticmethod
    def _pair_rows(ctx: StepContext, tok: object, data: dict) -> list[dict]:
        from graftbuild.generation import read_generations, render_prompt

        source = ctx.node_id.split(":", 1)[1]
        where = f"sources.{source}.transfer.sft"
        return [
            {
                "prompt": render_prompt(tok, g["prompt"], data["chat_template"], where),
                "completion": g["response"],
            }
            for g in read_generations(ctx.inputs["data"])
        ]
