"""Added tokens: a fine-tune's tokens beyond its base's vocabulary, and the fused vocabulary.

A fine-tune that adds tokens (chat or tool tokens, ``resize_token_embeddings``) has a tokenizer
with the base's vocabulary plus new tokens, and embedding / head matrices with rows for them.
The new rows are part of the skill: their delta is against nothing. The fused model's vocabulary
is the base's plus every source's added tokens, in fusion order; a token two sources both add at
the same id is one token. Only real conflicts are refused: a source that changes the base's own
vocabulary, or the same new token at different ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from graftbuild.errors import UserError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
_TOKEN_PROPS = ("single_word", "lstrip", "rstrip", "normalized", "special")


def tokenizers_differ(base: Path, source: Path) -> bool:
    """Whether any tokenizer file differs between two model folders (cheap: bytes only)."""
    for name in TOKENIZER_FILES:
        a, b = Path(base) / name, Path(source) / name
        if a.is_file() != b.is_file():
            return True
        if a.is_file() and a.read_bytes() != b.read_bytes():
            return True
    return False


def _load(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False
        )
    except Exception as e:  # transformers raises many kinds for a bad folder
        raise UserError(f"{folder}: cannot load its tokenizer ({type(e).__name__}: {e})") from None


def has_tokenizer(folder: Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def added_tokens(base: Path, source: Path, required: bool) -> list[dict[str, Any]] | None:
    """The tokens ``source``'s tokenizer has beyond ``base``'s, by id: ``{"content", "id",
    "special", "lstrip", ...}``; [] when the tokenizers are the same files or a folder has none
    (a fine-tune saved without its tokenizer keeps the base's). A UserError names the tokens
    when the source changes the base's own vocabulary (a token removed or moved). A tokenizer
    that does not load is a UserError when ``required`` (the source added embedding rows), else
    None: nothing is known of its tokens."""
    if not (has_tokenizer(base) and has_tokenizer(source)):
        return []
    if not tokenizers_differ(base, source):
        return []
    try:
        bt, st = _load(base), _load(source)
    except UserError:
        if required:
            raise
        return None
    bv, sv = bt.get_vocab(), st.get_vocab()
    changed = sorted((i, t) for t, i in bv.items() if sv.get(t) != i)
    if changed:
        shown = ", ".join(f"{t!r} (id {i} -> {sv.get(t, 'missing')})" for i, t in changed[:5])
        raise UserError(
            f"{source}: its tokenizer changes the base's vocabulary ({len(changed)} tokens: "
            f"{shown}); a source may only add tokens after the base's"
        )
    decoder = getattr(st, "added_tokens_decoder", {}) or {}
    out = []
    for t, i in sorted(sv.items(), key=lambda kv: kv[1]):
        if t in bv:
            continue
        tok = decoder.get(i)
        props = {p: bool(getattr(tok, p)) for p in _TOKEN_PROPS} if tok is not None else {}
        out.append({"content": t, "id": int(i)} | props)
    return out


def fuse_vocabularies(
    base_tokens: int, base_rows: int, packs: list[tuple[str, list[dict[str, Any]]]]
) -> tuple[list[dict[str, Any]], list[dict[int, int]]]:
    """The fused added tokens (with their fused ids) and, per pack, source id -> fused id.

    Tokens get fused ids after the base tokenizer's ``base_tokens``, in fusion order. A token at
    an id within the base's ``base_rows`` embedding rows (a padded vocabulary) keeps its row, so
    its fused id must be its source id. Conflicts are UserErrors naming the tokens."""
    fused: dict[str, dict[str, Any]] = {}
    by_id: dict[int, str] = {}
    maps: list[dict[int, int]] = []
    next_id = base_tokens
    for pack, tokens in packs:
        mapping: dict[int, int] = {}
        for tok in tokens:
            content, sid = tok["content"], int(tok["id"])
            if content in fused:
                seen = fused[content]
                if seen["source_id"] != sid:
                    raise UserError(
                        f"pack {pack!r} adds token {content!r} at id {sid}, pack "
                        f"{seen['pack']!r} at id {seen['source_id']}: the same new token "
                        "with different ids"
                    )
                mapping[sid] = seen["id"]
                continue
            fid = next_id
            if sid < base_rows and fid != sid:
                other = by_id.get(sid, "another token")
                raise UserError(
                    f"pack {pack!r} adds token {content!r} at id {sid}, within the base's "
                    f"embedding rows, where the fused vocabulary has {other!r}: the packs "
                    "disagree on that row"
                )
            if sid >= base_rows > fid:
                raise UserError(
                    f"pack {pack!r} adds token {content!r} in a new embedding row (id {sid}), "
                    f"but the fused tokenizer would give it id {fid}, one of the base's padded "
                    "rows; resize the fine-tune's embeddings within the base's rows"
                )
            next_id += 1
            fused[content] = tok | {"id": fid, "source_id": sid, "pack": pack}
            by_id[fid] = content
            mapping[sid] = fid
        maps.append(mapping)
    tokens = [
        {k: v for k, v in t.items() if k not in ("source_id", "pack")} for t in fused.values()
    ]
    return tokens, maps


def write_fused_tokenizer(base: Path, out: Path, tokens: list[dict[str, Any]]) -> None:
    """Save ``base``'s tokenizer with ``tokens`` added (checked to land on their fused ids)
    into ``out``, replacing the tokenizer files copied from the base."""
    from tokenizers import AddedToken

    tok = _load(base)
    for t in tokens:
        props = {p: t[p] for p in _TOKEN_PROPS if p in t}
        special = bool(props.pop("special", False))
        added = AddedToken(t["content"], special=special, **props)
        tok.add_tokens([added], special_tokens=special)
        got = tok.convert_tokens_to_ids(t["content"])
        if got != t["id"]:
            raise UserError(
                f"{base}: token {t['content']!r} would get id {got} in the fused tokenizer, "
                f"not {t['id']} (its row); the base's tokenizer numbers added tokens otherwise"
            )
    tok.save_pretrained(str(out))


def set_vocab_size(config: Path, size: int) -> None:
    """Set ``vocab_size`` in a saved config.json (a nested ``text_config``'s too)."""
    cfg = json.loads(config.read_text())
    for c in (cfg, cfg.get("text_config")):
        if isinstance(c, dict) and "vocab_size" in c:
            c["vocab_size"] = size
    config.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
