"""``eval``: held-out loss and perplexity of model nodes on declared datasets -> metrics.json."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import ClassVar

from graftbuild.steps.base import StepContext

METRICS_FILE = "metrics.json"


class EvalStep:
    name: ClassVar[str] = "eval"
    version: ClassVar[int] = 1

    def run(self, ctx: StepContext) -> None:
        from graftbuild.textdata import read_examples

        cfg = ctx.config
        texts = {d: read_examples(ctx.files[f"data.{d}"], cfg["field"]) for d in cfg["datasets"]}
        results: dict[str, dict[str, dict[str, float]]] = {}
        total = len(cfg["models"]) * len(texts)
        with ctx.progress.task(f"eval {ctx.node_id}", total) as advance:
            for i, model_id in enumerate(cfg["models"]):
                folder = ctx.inputs[f"model.{i}"]
                results[model_id] = {}
                for d, examples in texts.items():
                    loss, tokens = heldout_loss(
                        folder,
                        examples,
                        cfg["seq_len"],
                        cfg["batch_size"],
                        ctx.files[f"data.{d}"],
                        ctx.settings.device,
                    )
                    results[model_id][d] = {
                        "loss": round(loss, 6),
                        "perplexity": round(math.exp(min(loss, 50.0)), 4),
                        "tokens": tokens,
                    }
                    advance(1)
        (ctx.out / METRICS_FILE).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


def heldout_loss(
    folder: Path,
    examples: list[str],
    seq_len: int,
    batch_size: int,
    source: Path,
    device: str = "cpu",
) -> tuple[float, int]:
    """Mean next-token loss over every chunk of the data, in a fixed order."""
    import torch

    from graftbuild.modeling import load_causal_lm, load_tokenizer
    from graftbuild.textdata import token_chunks

    tok = load_tokenizer(folder)
    model = load_causal_lm(folder, device).eval()
    chunks = token_chunks(tok, examples, seq_len, source)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(chunks), batch_size):
            batch = chunks[start : start + batch_size].to(device)
            logits = model(input_ids=batch).logits[:, :-1].float()
            target = batch[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum"
            )
            total += nll.item()
            count += target.numel()
    return total / count, count
