"""Text datasets for finetuning and evaluation: .txt (one example per line) or .jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graftbuild.errors import UserError

if TYPE_CHECKING:
    import torch


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"data file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _jsonl_rows(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed object) of each non-blank line."""
    rows = []
    for i, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((i, json.loads(line)))
        except ValueError as e:
            raise UserError(f"{path}:{i}: not valid JSON ({e})") from None
    return rows


def _has_strings(row: Any, *fields: str) -> bool:
    return isinstance(row, dict) and all(isinstance(row.get(f), str) for f in fields)


def read_examples(path: Path, field: str = "text") -> list[str]:
    if path.suffix == ".jsonl":
        examples = []
        for i, row in _jsonl_rows(path):
            if not _has_strings(row, field):
                raise UserError(f"{path}:{i}: expected an object with a string field {field!r}")
            examples.append(row[field])
    else:
        examples = [line for line in _read_text(path).splitlines() if line.strip()]
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
    rows = _jsonl_rows(path)
    if not rows or not _has_strings(rows[0][1], "prompt", "response"):
        return None
    for i, row in rows:
        if not _has_strings(row, "prompt", "response"):
            raise UserError(
                f"{path}:{i}: expected an object with string fields 'prompt' and 'response'"
            )
    return [(row["prompt"], row["response"]) for _, row in rows]
