"""Regenerate the transfer example's assets from scratch, deterministically.

The transfer example teaches the quickstart's Llama-style base (byte-level BPE-512, trained on
plain English) a skill it lacks, from a teacher of another architecture and tokenizer: a tiny
GPT-2 with a character-level tokenizer. The skill is date formatting: an ISO date becomes a
written one, ``Write 2023-04-17:`` -> `` 17 Apr 2023`` (a rule, so unseen dates are
answerable). Writes, next to this file:

* ``teacher_tokenizer/`` -- a character-level ``WordLevel`` tokenizer (printable ASCII, one
  token per character, plus ``<unk>``, ``</s>`` (eos), ``<pad>``, ``<|user|>`` and
  ``<|assistant|>``) with a ``chat_template``; loads offline with
  ``transformers.AutoTokenizer.from_pretrained``;
* ``teacher_config.json`` -- a tiny ``GPT2Config`` (no dropout) whose vocab matches it;
* ``data/teacher.train.txt`` -- the teacher's own training text, one example per line, in the
  format its chat template renders: ``<|user|>PROMPT<|assistant|>RESPONSE`` (the training step
  joins lines with eos, so the teacher learns to stop). Every line is exactly 31 teacher tokens,
  32 with its eos, so that ``seq_len`` 64 chunks hold two whole examples at fixed positions: a
  GPT-2 (learned absolute positions) then learns the rule in ~200 steps, where examples of
  varying length at random offsets are not learned in 1200;
* ``data/prompts.jsonl`` -- ``{"prompt": PROMPT}`` per line: raw user prompts for the teacher;
* ``data/skill.heldout.jsonl`` -- the same pairs as ``{"prompt", "response"}`` objects, for the
  eval step's response-only loss;
* ``data/skill.heldout.txt`` -- ``PROMPT + RESPONSE`` per line, plain text, as the target is
  trained on the teacher's answers (the target has no chat template).

PROMPT is ``VERB YYYY-MM-DD:`` (VERB one of four five-letter verbs) and always ends with ``:``;
RESPONSE is `` DD Mon YYYY`` (zero-padded day, English month abbreviation) and always starts
with one space, so that ``prompt + response`` reads ``Write 2023-04-17: 17 Apr 2023``. The three
files use pairwise disjoint dates.

Only the standard library, ``tokenizers`` and ``transformers`` are used, every random choice
comes from a seeded ``random.Random``, and running the script twice yields byte-identical files.

Usage::

    python recipes/transfer/make_assets.py
"""

from __future__ import annotations

import calendar
import json
import os
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA_DIR = HERE / "data"
TOKENIZER_DIR = HERE / "teacher_tokenizer"
CONFIG_PATH = HERE / "teacher_config.json"

SEED = 20240917
N_TEACHER = 2000
N_PROMPTS = 400
N_HELDOUT = 200
YEARS = (1900, 2099)

UNK, EOS, PAD, USER, ASSISTANT = "<unk>", "</s>", "<pad>", "<|user|>", "<|assistant|>"
SPECIALS = (EOS, PAD, USER, ASSISTANT)
# One user message (and optionally the assistant's reply) -> the teacher's prompt format.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}"
    "{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)

# Prompt phrasings, all of one length: the date always comes last, right before the ":".
TEMPLATES = (
    "Write {}:",
    "Spell {}:",
    "Parse {}:",
    "Print {}:",
)
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
EXAMPLE_TOKENS = 32  # one teacher.train.txt line in teacher tokens, eos included


# --------------------------------------------------------------------------
# the skill: ISO date -> "DD Mon YYYY"
# --------------------------------------------------------------------------


def random_date(rng: random.Random) -> tuple[int, int, int]:
    year = rng.randint(*YEARS)
    month = rng.randint(1, 12)
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    return year, month, day


def prompt_for(rng: random.Random, date: tuple[int, int, int]) -> str:
    year, month, day = date
    return rng.choice(TEMPLATES).format(f"{year:04d}-{month:02d}-{day:02d}")


def answer_for(date: tuple[int, int, int]) -> str:
    """The correct response: one leading space, zero-padded day, month abbreviation."""
    year, month, day = date
    return f" {day:02d} {MONTHS[month - 1]} {year:04d}"


def make_data() -> None:
    """Draw distinct dates for the three files, so that no date is shared between them."""
    rng = random.Random(SEED)
    dates: dict[tuple[int, int, int], None] = {}  # insertion-ordered set
    total = N_TEACHER + N_PROMPTS + N_HELDOUT
    while len(dates) < total:
        dates.setdefault(random_date(rng), None)
    ordered = list(dates)
    teach = ordered[:N_TEACHER]
    prompts = ordered[N_TEACHER : N_TEACHER + N_PROMPTS]
    heldout = ordered[N_TEACHER + N_PROMPTS :]

    DATA_DIR.mkdir(parents=True, exist_ok=True)
    write_lines(
        DATA_DIR / "teacher.train.txt",
        [f"{USER}{prompt_for(rng, d)}{ASSISTANT}{answer_for(d)}" for d in teach],
    )
    write_lines(
        DATA_DIR / "prompts.jsonl",
        [json.dumps({"prompt": prompt_for(rng, d)}) for d in prompts],
    )
    pairs = [(prompt_for(rng, d), answer_for(d)) for d in heldout]
    write_lines(DATA_DIR / "skill.heldout.txt", [p + a for p, a in pairs])
    # The same pairs for the eval step's response-only loss (prompt given, answer scored).
    write_lines(
        DATA_DIR / "skill.heldout.jsonl",
        [json.dumps({"prompt": p, "response": a}) for p, a in pairs],
    )


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_bytes(("\n".join(lines) + "\n").encode("ascii"))


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="ascii")


# --------------------------------------------------------------------------
# teacher tokenizer: one token per printable ASCII character
# --------------------------------------------------------------------------


def make_tokenizer() -> int:
    """Write the tokenizer folder; return its vocabulary size."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {UNK: 0}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([UNK, *SPECIALS])
    size = tok.get_vocab_size()

    # tokenizer.json comes straight from `tokenizers`; the small JSON files are written by hand
    # so they do not depend on the transformers version (see the quickstart's make_assets.py).
    TOKENIZER_DIR.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_DIR.iterdir():
        f.unlink()
    tok.save(str(TOKENIZER_DIR / "tokenizer.json"))
    special = {"eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "additional_special_tokens": [USER, ASSISTANT],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 128,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t in (UNK, *SPECIALS)
        },
    }
    _write_json(TOKENIZER_DIR / "tokenizer_config.json", tok_cfg)
    _write_json(
        TOKENIZER_DIR / "special_tokens_map.json",
        {**special, "additional_special_tokens": [USER, ASSISTANT]},
    )
    check_tokenizer(tok)
    return size


def check_tokenizer(raw: object) -> None:
    """The saved folder loads offline, renders the chat template and round-trips the data."""
    from transformers import AutoTokenizer

    fast = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)
    if fast.eos_token != EOS or fast.pad_token != PAD or fast.pad_token_id == fast.eos_token_id:
        raise RuntimeError("saved tokenizer lacks its eos/pad tokens")
    for line in (DATA_DIR / "teacher.train.txt").read_text("ascii").splitlines():
        ids = fast.encode(line, add_special_tokens=False)
        if fast.decode(ids) != line:
            raise RuntimeError(f"round trip failed for {line!r}")
        prompt, answer = line[len(USER) :].split(ASSISTANT)
        rendered = fast.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        if rendered + answer != line:
            raise RuntimeError(f"chat template renders {rendered!r}, not the training format")
        if len(ids) != len(line) - len(USER) - len(ASSISTANT) + 2:
            raise RuntimeError(f"not one token per character: {line!r}")
        if len(ids) + 1 != EXAMPLE_TOKENS:
            raise RuntimeError(f"{line!r} is not {EXAMPLE_TOKENS} tokens with its eos")


# --------------------------------------------------------------------------
# teacher config
# --------------------------------------------------------------------------


def make_config(vocab_size: int) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    eos, pad = tok.token_to_id(EOS), tok.token_to_id(PAD)
    cfg = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": vocab_size,
        "n_positions": 128,
        "n_embd": 128,
        "n_layer": 3,
        "n_head": 4,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "tie_word_embeddings": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "dtype": "float32",
        "torch_dtype": "float32",
    }
    _write_json(CONFIG_PATH, cfg)
    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(str(CONFIG_PATH))
    if loaded.model_type != "gpt2" or loaded.vocab_size != vocab_size:
        raise RuntimeError("saved config does not load as a GPT-2 config")


def main() -> None:
    make_data()
    make_config(make_tokenizer())
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file() and p.suffix != ".py")
    print(f"wrote transfer assets under {HERE} ({total} bytes)")


if __name__ == "__main__":
    main()
