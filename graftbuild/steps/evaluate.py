"""``eval``: held-out loss and perplexity of model nodes on declared datasets -> metrics.json.

A text dataset is scored on every token (chunks of ``seq_len``). A .jsonl dataset of
``{"prompt", "response"}`` rows is scored on the response only, each row its own sequence
(prompt, response, eos): the loss of answering, not of guessing the question.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from graftbuild.recipe import ids
from graftbuild.release.gates import METRICS_FILE
from graftbuild.steps.base import Node, StepContext

if TYPE_CHECKING:
    from graftbuild.recipe import Recipe
    from graftbuild.weights.placement import Placement


class EvalStep:
    name: ClassVar[str] = "eval"
    version: ClassVar[int] = 2
    uses_accelerator: ClassVar[bool] = True

    def nodes(self, recipe: Recipe, out: Path) -> list[Node]:
        nodes = []
        for e in recipe.eval:
            datasets = sorted(e.data)
            nodes.append(
                Node(
                    ids.eval_(e.name),
                    "eval",
                    config={
                        "models": e.models,
                        "datasets": datasets,
                        "field": e.field,
                        "seq_len": e.seq_len,
                        "batch_size": e.batch_size,
                    },
                    deps={f"model.{i}": m for i, m in enumerate(e.models)},
                    files={f"data.{d}": e.data[d] for d in datasets},
                    labels={f"dep:model.{i}": f"model {m} changed" for i, m in enumerate(e.models)}
                    | {f"file:data.{d}": f"eval data '{d}' changed" for d in datasets}
                    | {"config.models": "evaluated models changed"},
                    output=out / "evals" / e.name,
                )
            )
        return nodes

    def run(self, ctx: StepContext) -> None:
        from graftbuild.weights.textdata import read_examples, read_pairs

        cfg, placement = ctx.config, ctx.placement
        pairs: dict[str, list[tuple[str, str]]] = {}
        texts: dict[str, list[str]] = {}
        for d in cfg["datasets"]:
            path = ctx.files[f"data.{d}"]
            rows = read_pairs(path)
            if rows is not None:
                pairs[d] = rows
            else:
                texts[d] = read_examples(path, cfg["field"])
        results: dict[str, dict[str, dict[str, float]]] = {}
        total = len(cfg["models"]) * len(cfg["datasets"])
        with ctx.progress.task(f"eval {ctx.node_id}", total) as advance:
            for i, model_id in enumerate(cfg["models"]):
                folder = ctx.inputs[f"model.{i}"]
                results[model_id] = {}
                for d in cfg["datasets"]:
                    if d in pairs:
                        loss, tokens = response_loss(folder, pairs[d], cfg["batch_size"], placement)
                    else:
                        loss, tokens = heldout_loss(
                            folder,
                            texts[d],
                            cfg["seq_len"],
                            cfg["batch_size"],
                            ctx.files[f"data.{d}"],
                            placement,
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
    where: Placement | str | None = None,
) -> tuple[float, int]:
    """Mean next-token loss over every chunk of the data, in a fixed order."""
    import torch

    from graftbuild.weights.modeling import load_causal_lm, load_tokenizer
    from graftbuild.weights.placement import Placement
    from graftbuild.weights.textdata import token_chunks

    tok = load_tokenizer(folder)
    placement = Placement.of(where)
    model = load_causal_lm(folder, placement).eval()
    chunks = token_chunks(tok, examples, seq_len, source)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(chunks), batch_size):
            batch = placement.put(chunks[start : start + batch_size])
            logits = model(input_ids=batch).logits[:, :-1].float()
            target = batch[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum"
            )
            total += nll.item()
            count += target.numel()
    return total / count, count


def response_loss(
    folder: Path,
    pairs: list[tuple[str, str]],
    batch_size: int,
    where: Placement | str | None = None,
) -> tuple[float, int]:
    """Mean next-token loss over the response tokens (and the eos after them), given the prompt.
    The response starts where tokenizing prompt and prompt + response diverge, as in training."""
    import torch

    from graftbuild.weights.modeling import load_causal_lm, load_tokenizer
    from graftbuild.weights.placement import Placement

    tok = load_tokenizer(folder)
    placement = Placement.of(where)
    model = load_causal_lm(folder, placement).eval()
    rows = []
    for prompt, response in pairs:
        head = tok(prompt, add_special_tokens=False)["input_ids"]
        full = tok(prompt + response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        same = (i for i, (a, b) in enumerate(zip(head, full, strict=False)) if a != b)
        cut = next(same, len(head))
        rows.append((full, max(cut, 1)))
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), width), tok.eos_token_id, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for j, (row, cut) in enumerate(batch):
                ids[j, : len(row)] = torch.tensor(row)
                labels[j, cut : len(row)] = torch.tensor(row[cut:])
                mask[j, : len(row)] = 1
            logits = model(input_ids=placement.put(ids), attention_mask=placement.put(mask)).logits
            logits, target = logits[:, :-1].float(), placement.put(labels[:, 1:])
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum"
            )
            total += nll.item()
            count += int((target != -100).sum())
    return total / count, count
