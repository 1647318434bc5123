"""Answering prompts with a causal LM: the teacher's responses (``teach``) and the target's own
(``dpo``'s rejected side). Deterministic for fixed model, prompts, settings, threads and device."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graftbuild.errors import UserError

if TYPE_CHECKING:
    from graftbuild.weights.placement import Placement

GENERATIONS_FILE = "generations.jsonl"


def render_prompt(tokenizer: Any, prompt: str, chat_template: bool, where: str) -> str:
    """The text the model is conditioned on: the raw prompt, or a one-turn chat rendered with the
    tokenizer's own template (ending where the assistant's answer begins)."""
    if not chat_template:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{where}: chat_template = true, but the tokenizer in "
            f"{getattr(tokenizer, 'name_or_path', '?')} has no chat template "
            "(no `chat_template` in tokenizer_config.json and no chat_template.jinja); "
            "set chat_template = false or give a tokenizer that has one"
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def generate(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    gen: dict[str, Any],
    placement: Placement,
    advance: Any,
) -> list[list[str]]:
    """``gen["samples"]`` responses per text, decoded without special tokens. Batches are cut
    in input order and left-padded, so the same inputs give the same batches every time."""
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    sampling = gen["temperature"] > 0
    kwargs: dict[str, Any] = {
        "max_new_tokens": gen["max_new_tokens"],
        "do_sample": sampling,
        "num_return_sequences": gen["samples"],
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if sampling:
        kwargs |= {"temperature": gen["temperature"], "top_p": gen["top_p"], "top_k": 0}
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", None
    )
    model.eval()
    torch.manual_seed(gen["seed"])
    out: list[list[str]] = []
    bs = gen["batch_size"]
    with torch.no_grad():
        for i in range(0, len(texts), bs):
            batch = tokenizer(
                texts[i : i + bs], return_tensors="pt", padding=True, add_special_tokens=False
            )
            batch = placement.inputs(batch)
            width = batch["input_ids"].shape[1]
            if limit is not None and width + gen["max_new_tokens"] > limit:
                raise UserError(
                    f"a prompt of {width} tokens plus max_new_tokens={gen['max_new_tokens']} "
                    f"exceeds the model's {limit} positions; shorten the prompts or lower "
                    "max_new_tokens"
                )
            seqs = model.generate(**batch, **kwargs)[:, width:]
            decoded = tokenizer.batch_decode(seqs, skip_special_tokens=True)
            for j in range(0, len(decoded), gen["samples"]):
                out.append(decoded[j : j + gen["samples"]])
            advance(len(texts[i : i + bs]))
    return out


def write_generations(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def read_generations(folder: Path) -> list[dict[str, Any]]:
    text = (folder / GENERATIONS_FILE).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line]
