"""``sft``: supervised fine-tuning through TRL's SFTTrainer, one step for two kinds of data.

* ``text``: a text file (a base or a source's ``finetune``), tokenized, joined by eos and cut
  into sequences of ``seq_len`` tokens; the loss covers every token.
* ``pairs``: a teacher's answers (the ``teach`` node of a ``transfer``); each example is the
  prompt (optionally in the target's chat template) and the response, loss on the response only.

The output is the trained model in the starting model's tensor layout, with its config and
tokenizer, so the pack step pairs it with the base tensor by tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from graftbuild.recipe import ids
from graftbuild.steps.base import Node, StepContext, declared_models

if TYPE_CHECKING:
    from graftbuild.recipe import FinetuneSpec, Recipe, TrainSpec


class SftStep:
    name: ClassVar[str] = "sft"
    version: ClassVar[int] = 1
    uses_accelerator: ClassVar[bool] = True

    def nodes(self, recipe: Recipe, out: Path) -> list[Node]:
        """Models trained on text (a base or teacher with ``finetune``, a source with
        ``finetune``) and ``sft:NAME`` of every transfer (the target trained on the teacher's
        answers)."""
        nodes = [
            text_sft_node(node, ids.init_of(node), spec.finetune, folder, what)
            for node, spec, folder, what in declared_models(recipe, out)
            if spec.path is None and spec.finetune is not None
        ]
        for name, src in recipe.sources.items():
            if src.finetune is not None:
                start = ids.start(src.parent)
                folder = out / "sources" / name
                nodes.append(
                    text_sft_node(ids.source(name), start, src.finetune, folder, f"source '{name}'")
                )
            elif src.transfer is not None:
                nodes.append(pairs_sft_node(recipe, name, out))
        return nodes

    def run(self, ctx: StepContext) -> None:
        from graftbuild.weights.modeling import load_causal_lm, load_tokenizer
        from graftbuild.weights.training import fit, quiet_training, require_trl, save_like_base

        require_trl()  # before any work: a missing extra is the user's to fix
        train, data = ctx.config["train"], ctx.config["data"]
        base_dir = ctx.inputs["base"]
        with quiet_training():
            tok = load_tokenizer(base_dir)
            if data["kind"] == "text":
                rows, max_length = self._text_rows(ctx, tok, data), data["seq_len"]
            else:
                rows, max_length = self._pair_rows(ctx, tok, data), data["max_len"]
            model = load_causal_lm(base_dir, ctx.placement)
            model = fit(ctx, "SFT", model, tok, rows, train, max_length=max_length, packing=False)
            save_like_base(model, base_dir, ctx.out, ctx.node_id)

    @staticmethod
    def _text_rows(ctx: StepContext, tok: object, data: dict) -> list[dict]:
        from graftbuild.weights.textdata import read_examples, training_chunks

        path = ctx.files["data"]
        chunks = training_chunks(tok, read_examples(path, data["field"]), data["seq_len"])
        return [{"input_ids": row} for row in chunks]

    @staticmethod
    def _pair_rows(ctx: StepContext, tok: object, data: dict) -> list[dict]:
        from graftbuild.weights.generation import read_generations, render_prompt

        source = ctx.node_id.split(":", 1)[1]
        where = f"sources.{source}.transfer.sft"
        return [
            {
                "prompt": render_prompt(tok, g["prompt"], data["chat_template"], where),
                "completion": g["response"],
            }
            for g in read_generations(ctx.inputs["data"])
        ]


def train_config(spec: TrainSpec, exclude: set[str] | None = None) -> dict[str, Any]:
    """A training spec as it goes into a key: unset options left out, so that adding an option
    later does not change existing keys."""
    return spec.model_dump(mode="json", exclude=exclude, exclude_none=True)


def text_sft_node(node_id: str, start: str, spec: FinetuneSpec, out: Path, what: str) -> Node:
    """SFT on a text file: the model ``start`` trained by causal LM on every token."""
    return Node(
        node_id,
        "sft",
        config={
            "train": train_config(spec, {"data", "field", "seq_len"}),
            # "tail": the last partial chunk is padded and trained on (it was dropped before)
            "data": {"kind": "text", "field": spec.field, "seq_len": spec.seq_len, "tail": "pad"},
        },
        deps={"base": start},
        files={"data": spec.data},
        labels={
            "file:data": f"{what} training data changed",
            "config.train": f"{what} finetune settings changed",
            "config.data": f"{what} data settings changed",
            "dep:base": f"{start} changed",
        },
        output=out,
    )


def pairs_sft_node(recipe: Recipe, name: str, out: Path) -> Node:
    """``sft:NAME``: the target (the base, or its parent's graft) trained on the teacher's
    answers; θ* itself when the transfer declares no DPO."""
    t = recipe.sources[name].transfer
    assert t is not None
    start = ids.start(recipe.sources[name].parent)
    return Node(
        ids.sft(name),
        "sft",
        config={
            "train": train_config(t.sft, {"max_len", "chat_template"}),
            "data": {
                "kind": "pairs",
                "max_len": t.sft.max_len,
                "chat_template": t.sft.chat_template,
            },
        },
        deps={"base": start, "data": ids.teach(name)},
        labels={
            "config.train": f"SFT settings of '{name}' changed",
            "config.data": f"SFT data settings of '{name}' changed",
            "dep:data": f"teacher answers for '{name}' changed",
            "dep:base": f"{start} changed",
        },
        output=out / "sources" / name / ("sft" if t.dpo is not None else ""),
    )
