"""Text datasets for finetuning and evaluation: .txt (one example per line) or .jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graftbuild.errors import UserError

if TYPE_CHECKING:
    import torch


def read_examples(path: Path, field: str = "text") -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"data file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    examples: list[str] = []
    if path.suffix == ".jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise UserError(f"{path}:{i}: not valid JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise UserError(f"{path}:{i}: expected an object with a string field {field!r}")
            examples.append(row[field])
    else:
        examples = [line for line in text.splitlines() if line.strip()]
    if not examples:
        raise UserError(f"{path}: no examples in this file")
    return examples


def token_chunks(tokenizer: Any, examples: list[str], seq_len: int, source: Path) -> torch.Tensor:
    """Examples tokenized, joined by eos, cut into [n, seq_len] chunks (the tail is dropped)."""
    import torch

    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for text in examples:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(eos)
    n = len(ids) // seq_len
    if n == 0:
        raise UserError(
            f"{source}: {len(ids)} tokens is less than one sequence of seq_len={seq_len}"
        )
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def read_pairs(path: Path) -> list[tuple[str, str]] | None:
    """(prompt, response) rows of a .jsonl file whose first row has string fields ``prompt`` and
    ``response``; None for any other file (it is plain text, scored on every token)."""
    if path.suffix != ".jsonl":
        return None
    lines = [(i, line) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]
    rows = []
    for i, line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path}:{i}: not valid JSON ({e})") from None
        rows.append((i, row))
    if not rows or not (isinstance(rows[0][1], dict) and {"prompt", "response"} <= set(rows[0][1])):
        return None
    out = []
    for i, row in rows:
        if not (
            isinstance(row, dict)
            and isinstance(row.get("prompt"), str)
            and isinstance(row.get("response"), str)
        ):
            raise UserError(
                f"{path}:{i}: expected an object with string fields 'prompt' and 'response'"
            )
        out.append((row["prompt"], row["response"]))
    return out
