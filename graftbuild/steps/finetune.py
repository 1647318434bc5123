"""``finetune``: full-parameter causal-LM training of the base on a local text file.

Deterministic for fixed inputs, seed, thread count and device: batches come from a seeded
generator, no data loader workers, no dropout randomness beyond the seeded global RNG.
"""

from __future__ import annotations

import math
from typing import ClassVar

from graftbuild.errors import BuildError
from graftbuild.steps.base import StepContext


class FinetuneStep:
    name: ClassVar[str] = "finetune"
    version: ClassVar[int] = 1

    def run(self, ctx: StepContext) -> None:
        import torch

        from graftbuild.modeling import load_causal_lm, load_tokenizer
        from graftbuild.tensors import (
            ModelWeights,
            TensorInfo,
            copy_non_weight_files,
            torch_dtype_to_st,
            write_model_weights,
        )
        from graftbuild.textdata import read_examples, token_chunks

        cfg = ctx.config["train"]
        base_dir = ctx.inputs["base"]
        torch.manual_seed(cfg["seed"])
        tok = load_tokenizer(base_dir)
        data = token_chunks(
            tok, read_examples(ctx.files["data"], cfg["field"]), cfg["seq_len"], ctx.files["data"]
        )
        device = ctx.settings.device
        model = load_causal_lm(base_dir, device)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        steps, warmup = cfg["steps"], cfg["warmup_steps"]

        def lr_at(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, 1.0 - (step - warmup) / max(1, steps - warmup))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        gen = torch.Generator().manual_seed(cfg["seed"])
        with ctx.progress.task(f"finetune {ctx.node_id}", steps) as advance:
            for _ in range(steps):
                idx = torch.randint(len(data), (cfg["batch_size"],), generator=gen)
                batch = data[idx].to(device)
                loss = model(input_ids=batch, labels=batch).loss
                if not math.isfinite(loss.item()):
                    raise BuildError(f"{ctx.node_id}: training loss became {loss.item()}; lower lr")
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                advance(1)

        # Write the weights under the base's own tensor names and layout, so that the pack step
        # pairs them one to one.
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        with ModelWeights(base_dir) as base:
            names = base.names()
            missing = [n for n in names if n not in state]
            if missing:
                raise BuildError(f"{ctx.node_id}: trained model lacks base tensors {missing[:5]}")
            infos = [
                TensorInfo(n, tuple(state[n].shape), torch_dtype_to_st(state[n].dtype), base_dir)
                for n in names
            ]
        copy_non_weight_files(base_dir, ctx.out)
        write_model_weights(ctx.out, infos, ((n, state[n]) for n in names), shard_size=2**62)
