"""``eval``: held-out loss and perplexity of model nodes on declared datasets -> metrics.json.

A text dataset is scored on every token (chunks of ``seq_len``). A .jsonl dataset of
``{"prompt", "response"}`` rows is scored on the response only, each row its own sequence
(prompt, response, eos): the loss of answering, not of guessing the question.

A .jsonl dataset of ``{"query", "doc"}`` rows is a retrieval task, the metric that fits an
encoder (and is defined for any model): every query and every distinct doc is embedded as the
mean of the model's last hidden state over its tokens, L2-normalised (sentence-transformers'
mean pooling); each query ranks all docs by cosine similarity, and the eval reports the mean
reciprocal rank of the query's own doc (``mrr``) and how often it ranks first (``recall@1``).
An encoder has no next-token loss: an eval that gives one a text or prompt/response dataset is
refused at plan time, naming the node, the model and the dataset.
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
    import torch

    from graftbuild.recipe import EvalSpec, Recipe
    from graftbuild.weights.placement import Placement


class EvalStep:
    name: ClassVar[str] = "eval"
    version: ClassVar[int] = 2
    uses_accelerator: ClassVar[bool] = True

    def nodes(self, recipe: Recipe, out: Path) -> list[Node]:
        nodes = []
        for e in recipe.eval:
            datasets = sorted(e.data)
            check_metrics(recipe, e)
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
        from graftbuild.weights.textdata import read_examples, read_pairs, read_retrieval

        cfg, placement = ctx.config, ctx.placement
        pairs: dict[str, list[tuple[str, str]]] = {}
        texts: dict[str, list[str]] = {}
        retrieval: dict[str, list[tuple[str, str]]] = {}
        for d in cfg["datasets"]:
            path = ctx.files[f"data.{d}"]
            rows = read_pairs(path)
            found = read_retrieval(path)
            if found is not None:
                retrieval[d] = found
            elif rows is not None:
                pairs[d] = rows
            else:
                texts[d] = read_examples(path, cfg["field"])
        results: dict[str, dict[str, dict[str, float]]] = {}
        self._check_kinds(ctx, texts, pairs)
        total = len(cfg["models"]) * len(cfg["datasets"])
        with ctx.progress.task(f"eval {ctx.node_id}", total) as advance:
            for i, model_id in enumerate(cfg["models"]):
                folder = ctx.inputs[f"model.{i}"]
                results[model_id] = {}
                for d in cfg["datasets"]:
                    if d in retrieval:
                        results[model_id][d] = retrieval_metrics(
                            folder, retrieval[d], cfg["seq_len"], cfg["batch_size"], placement
                        )
                        advance(1)
                        continue
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

    @staticmethod
    def _check_kinds(ctx: StepContext, texts: dict, pairs: dict) -> None:
        """Loss datasets need causal LMs (plan time checks the recipe's own models; this is the
        step's own guard, on the folders it was given)."""
        from graftbuild.errors import UserError
        from graftbuild.weights.modeling import is_causal_lm

        loss_data = sorted([*texts, *pairs])
        for i, model_id in enumerate(ctx.config["models"]):
            if loss_data and not is_causal_lm(ctx.inputs[f"model.{i}"]):
                raise UserError(
                    f"{ctx.node_id}: {model_id} is an encoder, it has no next-token loss on "
                    f"{loss_data}; give it a retrieval dataset (.jsonl of {{query, doc}})"
                )


def check_metrics(recipe: Recipe, spec: EvalSpec) -> None:
    """Refuse, at plan time, an eval that asks an encoder for a loss, or gates a retrieval
    dataset (gates compare losses)."""
    from graftbuild.errors import UserError
    from graftbuild.weights.textdata import is_retrieval

    node = ids.eval_(spec.name)
    where = f"{recipe.path}: {node}"
    retrieval = {d for d, path in spec.data.items() if is_retrieval(path)}
    for g in spec.gates:
        if g.data in retrieval:
            raise UserError(
                f"{where}: gate on {g.model} names the retrieval dataset {g.data!r}; gates "
                "compare held-out losses, give them a text or prompt/response dataset"
            )
    loss_data = sorted(set(spec.data) - retrieval)
    if not loss_data:
        return
    for m in spec.models:
        if not model_is_causal(recipe, m):
            raise UserError(
                f"{where}: {m} is an encoder, it has no next-token loss on {loss_data}; give "
                'it a retrieval dataset instead (a .jsonl of {"query": ..., "doc": ...} rows, '
                "reported as MRR and recall@1)"
            )


def model_is_causal(recipe: Recipe, model_id: str) -> bool:
    """Whether a model node of the recipe is a causal LM, from the config of the model it is
    built from (a teacher's own, else the base's: every other model shares its architecture)."""
    import json

    from graftbuild.weights.modeling import auto_class, read_config

    spec = recipe.base
    if ids.kind_of(model_id) == "teacher":
        name = ids.name_of(model_id)
        if name in recipe.teachers:
            spec = recipe.teachers[name]
        else:
            return auto_class(read_config(recipe.teacher_path(name))) == "AutoModelForCausalLM"
    if spec.path is not None:
        config = read_config(spec.path)
    else:
        try:
            config = json.loads(spec.config.read_text())  # type: ignore[union-attr]
        except (OSError, ValueError):
            return True  # the init step reports a bad config
    return auto_class(config) == "AutoModelForCausalLM"


def retrieval_metrics(
    folder: Path,
    rows: list[tuple[str, str]],
    seq_len: int,
    batch_size: int,
    where: Placement | str | None = None,
) -> dict[str, float]:
    """MRR and recall@1 of each query's own doc among every distinct doc of the dataset."""

    from graftbuild.weights.modeling import load_model, load_tokenizer
    from graftbuild.weights.placement import Placement

    tok = load_tokenizer(folder, need_eos=False)
    placement = Placement.of(where)
    model = load_model(folder, placement).eval()
    return retrieval_scores(model, tok, rows, seq_len, batch_size, placement)


def retrieval_scores(
    model: object,
    tokenizer: object,
    rows: list[tuple[str, str]],
    seq_len: int,
    batch_size: int,
    placement: Placement,
) -> dict[str, float]:
    """``retrieval_metrics`` of a loaded model (a routed bundle's, with an option active)."""
    import torch

    tok = tokenizer
    docs = list(dict.fromkeys(doc for _, doc in rows))
    gold = torch.tensor([docs.index(doc) for _, doc in rows])
    q = embed(model, tok, [query for query, _ in rows], seq_len, batch_size, placement)
    d = embed(model, tok, docs, seq_len, batch_size, placement)
    scores = q @ d.T
    own = scores.gather(1, gold[:, None])
    rank = (scores > own).sum(dim=1) + 1  # ties count in the query's favour, deterministically
    return {
        "mrr": round(float((1.0 / rank.double()).mean()), 6),
        "recall@1": round(float((rank == 1).double().mean()), 6),
        "queries": len(rows),
        "docs": len(docs),
    }


def embed(
    model: object,
    tokenizer: object,
    texts: list[str],
    seq_len: int,
    batch_size: int,
    placement: Placement,
) -> torch.Tensor:
    """[len(texts), hidden] L2-normalised mean of the last hidden state over each text's tokens
    (cut at ``seq_len``), on the CPU in float32."""
    import torch

    causal = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)  # type: ignore[attr-defined]
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            rows = [
                tokenizer(t, add_special_tokens=not causal)["input_ids"][:seq_len]  # type: ignore[operator]
                for t in texts[start : start + batch_size]
            ]
            width = max(1, *(len(r) for r in rows))
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
                mask[j, : len(r)] = 1
            hidden = (
                model(  # type: ignore[operator]
                    input_ids=placement.put(ids),
                    attention_mask=placement.put(mask),
                    output_hidden_states=True,
                )
                .hidden_states[-1]
                .float()
                .cpu()
            )
            m = mask[:, :, None].float()
            mean = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
            out.append(torch.nn.functional.normalize(mean, dim=1))
    return torch.cat(out)


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
