"""``dpo``: preference tuning after SFT, through TRL's DPOTrainer.

For each prompt the teacher's response is *chosen* and the SFT model's own response (generated
here, with the transfer's generation settings at ``dpo.temperature``) is *rejected*, as
FuseChat-3.0 builds its pairs. Pairs where the two agree carry no preference and are dropped.
The SFT model is the reference; its log-probabilities are computed once before training, so
only one model is in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from graftbuild.errors import BuildError
from graftbuild.recipe import ids
from graftbuild.steps.base import Node, StepContext
from graftbuild.steps.sft import train_config

if TYPE_CHECKING:
    from graftbuild.recipe import Recipe


class DpoStep:
    name: ClassVar[str] = "dpo"
    version: ClassVar[int] = 1
    uses_accelerator: ClassVar[bool] = True

    def nodes(self, recipe: Recipe, out: Path) -> list[Node]:
        """``dpo:NAME`` of every transfer that declares ``dpo``: θ*."""
        nodes = []
        for name, src in recipe.sources.items():
            t = src.transfer
            if t is None or t.dpo is None:
                continue
            nodes.append(
                Node(
                    ids.dpo(name),
                    "dpo",
                    config={
                        "train": train_config(t.dpo),
                        "sft": {"max_len": t.sft.max_len, "chat_template": t.sft.chat_template},
                        "generation": t.generation.model_dump(mode="json"),
                    },
                    deps={"model": ids.sft(name), "data": ids.teach(name)},
                    labels={
                        "config.train": f"DPO settings of '{name}' changed",
                        "config.sft": f"SFT data settings of '{name}' changed",
                        "config.generation": f"generation settings of '{name}' changed",
                        "dep:model": f"{ids.sft(name)} changed",
                        "dep:data": f"teacher answers for '{name}' changed",
                    },
                    output=out / "sources" / name / "dpo",
                )
            )
        return nodes

    def run(self, ctx: StepContext) -> None:
        from graftbuild.weights.generation import generate, read_generations, render_prompt
        from graftbuild.weights.modeling import load_causal_lm, load_tokenizer
        from graftbuild.weights.training import fit, quiet_training, require_trl, save_like_base

        require_trl()  # before any work: a missing extra is the user's to fix

        train, sft, gen = ctx.config["train"], ctx.config["sft"], ctx.config["generation"]
        model_dir = ctx.inputs["model"]
        source = ctx.node_id.split(":", 1)[1]
        where = f"sources.{source}.transfer.sft"
        with quiet_training():
            tok = load_tokenizer(model_dir)
            taught = read_generations(ctx.inputs["data"])
            prompts = list(dict.fromkeys(g["prompt"] for g in taught))
            texts = {p: render_prompt(tok, p, sft["chat_template"], where) for p in prompts}
            model = load_causal_lm(model_dir, ctx.placement)
            own_gen = gen | {"samples": 1, "temperature": train["temperature"]}
            with ctx.progress.task(f"answer {ctx.node_id}", len(prompts), unit="prompt") as advance:
                asked = [texts[p] for p in prompts]
                own = generate(model, tok, asked, own_gen, ctx.placement, advance)
            rejected = {p: r[0] for p, r in zip(prompts, own, strict=True)}
            rows = [
                {
                    "prompt": texts[g["prompt"]],
                    "chosen": g["response"],
                    "rejected": rejected[g["prompt"]],
                }
                for g in taught
                if g["response"].strip() != rejected[g["prompt"]].strip()
            ]
            if not rows:
                raise BuildError(
                    f"{ctx.node_id}: the SFT model already gives the teacher's answer to every "
                    "prompt, so there is no preference to learn; remove `dpo` from the transfer"
                )
            ctx.progress.log(f"{ctx.node_id}: {len(rows)} preference pairs of {len(taught)}")
            model = fit(
                ctx,
                "DPO",
                model,
                tok,
                rows,
                train,
                beta=train["beta"],
                max_length=sft["max_len"],
                precompute_ref_log_probs=True,
                **dpo_loss(train),
            )
            save_like_base(model, model_dir, ctx.out, ctx.node_id)


def dpo_loss(train: dict) -> dict:
    """TRL's loss settings for a DPO spec: (length-normalised) sigmoid DPO, plus the chosen
    response's NLL when ``sft_weight`` > 0."""
    dpo = "sigmoid_norm" if train["length_normalize"] else "sigmoid"
    if train["sft_weight"] > 0:
        return {"loss_type": [dpo, "sft"], "loss_weights": [1.0, train["sft_weight"]]}
    return {"loss_type": [dpo]}
