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


def separator(tokenizer: Any) -> int:
    """The token that ends each example: eos, or [SEP] for an encoder's tokenizer."""
    for t in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if t is not None:
            return int(t)
    raise UserError(
        f"{tokenizer.name_or_path}: the tokenizer defines neither an eos nor a sep token"
    )


def token_ids(tokenizer: Any, examples: list[str]) -> list[int]:
    """Examples tokenized and joined, each followed by eos (or [SEP], see ``separator``)."""
    ids: list[int] = []
    end = separator(tokenizer)
    for text in examples:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(end)
    return ids


def token_chunks(tokenizer: Any, examples: list[str], seq_len: int, source: Path) -> torch.Tensor:
    """Examples tokenized, joined by eos, cut into [n, seq_len] chunks (the tail is dropped)."""
    import torch

    ids = token_ids(tokenizer, examples)
    n = len(ids) // seq_len
    if n == 0:
        raise UserError(
            f"{source}: {len(ids)} tokens is less than one sequence of seq_len={seq_len}"
        )
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def training_chunks(tokenizer: Any, examples: list[str], seq_len: int) -> list[list[int]]:
    """Examples tokenized, joined by eos, cut into chunks of ``seq_len`` tokens; the last chunk
    keeps its remainder (the trainer's collator pads it and masks the padding out of the loss),
    so every example, the last appended one included, is trained on."""
    ids = token_ids(tokenizer, examples)
    return [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]


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


def read_retrieval(path: Path) -> list[tuple[str, str]] | None:
    """(query, doc) rows of a .jsonl file whose first row has string fields ``query`` and
    ``doc`` (a retrieval dataset); None for any other file."""
    if path.suffix != ".jsonl":
        return None
    rows = _jsonl_rows(path)
    if not rows or not _has_strings(rows[0][1], "query", "doc"):
        return None
    for i, row in rows:
        if not _has_strings(row, "query", "doc"):
            raise UserError(f"{path}:{i}: expected an object with string fields 'query' and 'doc'")
    return [(row["query"], row["doc"]) for _, row in rows]


def is_retrieval(path: Path) -> bool:
    """Whether a data file is a ``{query, doc}`` jsonl, from its first non-blank line (cheap
    enough to ask at plan time; a missing or malformed file is left to the step to report)."""
    import json

    if path.suffix != ".jsonl":
        return False
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    return _has_strings(json.loads(line), "query", "doc")
    except (OSError, ValueError):
        return False
    return False
