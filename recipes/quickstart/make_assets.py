"""Regenerate the quickstart recipe's assets from scratch, deterministically.

Writes, next to this file:

* ``data/{arith,code,lang,general}.{train,heldout}.txt`` -- one example per
  line, four skills with clearly distinct distributions; the held-out split is
  drawn from the same generator but shares no line with the train split;
* ``tokenizer/`` -- a byte-level BPE tokenizer (vocab 512, ``<|endoftext|>`` as
  bos/eos/unk/pad) trained on the union of the train files, loadable offline
  with ``transformers.AutoTokenizer.from_pretrained``;
* ``base_config.json`` -- a tiny Llama-style ``LlamaConfig`` as JSON.

Only the standard library, ``tokenizers`` and ``transformers`` are used, every
random choice comes from a seeded ``random.Random``, and running the script
twice yields byte-identical files.

Usage::

    python recipes/quickstart/make_assets.py
"""

from __future__ import annotations

import ast
import json
import os
import random
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA_DIR = HERE / "data"
TOKENIZER_DIR = HERE / "tokenizer"
CONFIG_PATH = HERE / "base_config.json"

SEED = 20240601
N_TRAIN = 2000
N_HELDOUT = 250
MAX_CHARS = 80
VOCAB_SIZE = 512
EOT = "<|endoftext|>"
SKILLS = ("arith", "code", "lang", "general")


# --------------------------------------------------------------------------
# arith: correct integer arithmetic, "a op b = c"
# --------------------------------------------------------------------------


def gen_arith(rng: random.Random) -> str:
    op = rng.choice("++--*")
    if op == "+":
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        c = a + b
    elif op == "-":
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        if b > a:
            a, b = b, a
        c = a - b
    else:
        a, b = rng.randint(2, 19), rng.randint(2, 12)
        c = a * b
    return f"{a} {op} {b} = {c}"


# --------------------------------------------------------------------------
# code: one-line Python snippets, all checked with ast.parse
# --------------------------------------------------------------------------

# fmt: off
_VARS = [
    "x", "y", "n", "k", "val", "item", "count", "total", "idx", "acc",
]
_LISTS = [
    "xs", "ys", "nums", "items", "vals", "data", "row", "buf",
]
_WORDS = [
    "alpha", "beta", "gamma", "delta", "red", "blue", "green", "apple", "pear", "plum", "north",
    "south", "east", "west", "key", "name",
]
# fmt: on


def _code_templates(rng: random.Random) -> str:
    v = rng.choice(_VARS)
    w = rng.choice([u for u in _VARS if u != v])
    lst = rng.choice(_LISTS)
    k = rng.randint(1, 9)
    n = rng.randint(2, 20)
    t = rng.randrange(16)
    if t == 0:
        f = rng.choice(["add", "bump", "shift"])
        return f"def {f}_{k}({v}): return {v} + {k}"
    if t == 1:
        f = rng.choice(["mul", "scale", "twice"])
        return f"def {f}_{k}({v}): return {v} * {k}"
    if t == 2:
        return f"def sub_{k}({v}): return {v} - {k}"
    if t == 3:
        op = rng.choice(["*", "+", "-", "%", "//"])
        return f"for {v} in range({n}): print({v} {op} {k})"
    if t == 4:
        op = rng.choice(["*", "+", "**"])
        return f"{lst} = [{v} {op} {k} for {v} in range({n})]"
    if t == 5:
        return f"{lst} = [{v} for {v} in range({n}) if {v} % {k + 1} == 0]"
    if t == 6:
        return f"{v} = sum({w} * {k} for {w} in range({n}))"
    if t == 7:
        return f"while {v} > {k}: {v} = {v} // 2"
    if t == 8:
        return f"if {v} > {n}: {w} = {v} - {k}"
    if t == 9:
        return f"sq_{k} = lambda {v}: {v} ** {rng.randint(2, 4)}"
    if t == 10:
        meth = rng.choice(["upper", "lower", "title", "strip"])
        return f'{v} = "{rng.choice(_WORDS)}".{meth}()'
    if t == 11:
        a, b = rng.sample(_WORDS, 2)
        return f'{v} = {{"{a}": {rng.randint(0, 99)}, "{b}": {rng.randint(0, 99)}}}'
    if t == 12:
        nums = ", ".join(str(rng.randint(0, 99)) for _ in range(rng.randint(2, 5)))
        fn = rng.choice(["len", "sum", "max", "min", "sorted"])
        return f"print({fn}([{nums}]))"
    if t == 13:
        return f"def is_{rng.choice(['even', 'odd'])}({v}): return {v} % 2 == {k % 2}"
    if t == 14:
        return f"{lst}.append({v} * {k})"
    return f"for {v}, {w} in enumerate({lst}): {lst}[{v}] = {w} + {k}"


def gen_code(rng: random.Random) -> str:
    line = _code_templates(rng)
    ast.parse(line)  # every snippet must be valid Python
    return line


# --------------------------------------------------------------------------
# lang: a made-up language ("Velan"), subject-verb-object with agreement
#
#   noun stem + case/number suffix: subject -a (sg) / -ari (pl)
#                                   object  -on (sg) / -oni (pl)
#                                   place   -esh (after the preposition "im")
#   adjectives follow their noun and copy its suffix exactly
#   verb = [tense prefix zo- past | na- future] + stem + -ek (sg) / -eku (pl),
#          agreeing in number with the subject; optional negation "ne" first
#   the sentence ends with " ."
# --------------------------------------------------------------------------

# fmt: off
_NOUNS = [
    "tav", "mir", "kes", "dor", "pel", "sun", "bor", "lim", "nak", "fes", "gor", "yul", "ramb",
    "ilt", "quen", "osk",
]
_ADJS = [
    "lus", "ken", "vir", "dal", "sem", "hor", "pim", "zet",
]
_VERBS = [
    "vak", "tel", "mor", "sil", "gan", "pru", "dess", "hol", "rin", "kov",
]
_PLACES = [
    "dom", "vald", "ser", "kalm", "tunn", "perr",
]
# fmt: on


def _np(rng: random.Random, suffix: str) -> str:
    words = [rng.choice(_NOUNS) + suffix]
    if rng.random() < 0.45:
        words.append(rng.choice(_ADJS) + suffix)
    return " ".join(words)


def gen_lang(rng: random.Random) -> str:
    plural_subj = rng.random() < 0.4
    subj = _np(rng, "ari" if plural_subj else "a")
    verb = rng.choice(["", "", "zo", "na"]) + rng.choice(_VERBS)
    verb += "eku" if plural_subj else "ek"
    if rng.random() < 0.2:
        verb = "ne " + verb
    obj = _np(rng, "oni" if rng.random() < 0.35 else "on")
    words = [subj, verb, obj]
    if rng.random() < 0.4:
        words.append("im " + rng.choice(_PLACES) + "esh")
    return " ".join(words) + " ."


# --------------------------------------------------------------------------
# general: simple templated English, the "base domain"
# --------------------------------------------------------------------------

# fmt: off
_NAMES = [
    "Anna", "Ben", "Clara", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack", "Lucy",
    "Mark", "Nora", "Oscar", "Paul", "Rosa",
]
_SUBJECTS = [
    "the farmer", "the teacher", "a child", "the old man", "my sister", "the doctor",
    "a young girl", "the baker", "our neighbor", "the driver", "a tall woman", "the student",
    "his brother",
]
_VERBS_PAST = [
    "found", "bought", "painted", "carried", "cleaned", "opened", "watched", "fixed", "sold",
    "lost", "washed", "borrowed",
]
_VERBS_PRES = [
    "finds", "buys", "paints", "carries", "cleans", "opens", "watches", "fixes", "sells", "loses",
    "washes", "borrows",
]
_OBJECTS = [
    "a red box", "the small chair", "an old book", "a blue cup", "the wooden door", "a warm coat",
    "the green bike", "a long letter", "the heavy bag", "a new lamp", "the garden gate",
    "a silver key",
]
_PLACES_EN = [
    "in the kitchen", "at the market", "near the river", "in the park", "at school",
    "behind the house", "in the city", "on the farm", "by the lake", "at the station",
    "in the village",
]
_TIMES = [
    "yesterday", "last week", "this morning", "on Sunday", "at night", "in the spring",
    "after lunch", "before dinner",
]
_HABITS = [
    "every day", "every week", "on Mondays", "in the evening", "each morning", "twice a month",
]
_ADJ_EN = [
    "happy", "tired", "quiet", "busy", "kind", "brave", "hungry", "calm",
]
# fmt: on


def gen_general(rng: random.Random) -> str:
    t = rng.randrange(5)
    if t == 0:
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS_PAST)} {rng.choice(_OBJECTS)} "
        s += f"{rng.choice(_PLACES_EN)} {rng.choice(_TIMES)}."
    elif t == 1:
        s = f"{rng.choice(_NAMES)} {rng.choice(_VERBS_PRES)} {rng.choice(_OBJECTS)} "
        s += f"{rng.choice(_PLACES_EN)} {rng.choice(_HABITS)}."
    elif t == 2:
        a, b = rng.sample(_NAMES, 2)
        s = f"{a} and {b} were {rng.choice(_ADJ_EN)} {rng.choice(_PLACES_EN)}."
    elif t == 3:
        s = f"{rng.choice(_SUBJECTS)} was {rng.choice(_ADJ_EN)} because "
        s += f"{rng.choice(_NAMES)} {rng.choice(_VERBS_PAST)} {rng.choice(_OBJECTS)}."
    else:
        s = f"{rng.choice(_TIMES)}, {rng.choice(_SUBJECTS)} {rng.choice(_VERBS_PAST)} "
        s += f"{rng.choice(_OBJECTS)}."
    return s[0].upper() + s[1:]


GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "arith": gen_arith,
    "code": gen_code,
    "lang": gen_lang,
    "general": gen_general,
}


def make_split(name: str) -> tuple[list[str], list[str]]:
    """Draw N_TRAIN + N_HELDOUT distinct lines; the first go to train."""
    rng = random.Random(f"{SEED}:{name}")
    gen = GENERATORS[name]
    seen: dict[str, None] = {}  # insertion-ordered set
    attempts = 0
    while len(seen) < N_TRAIN + N_HELDOUT:
        attempts += 1
        if attempts > 100 * (N_TRAIN + N_HELDOUT):
            raise RuntimeError(f"{name}: generator too narrow for disjoint splits")
        line = gen(rng)
        if len(line) > MAX_CHARS or "\n" in line:
            raise ValueError(f"{name}: bad line {line!r}")
        seen.setdefault(line, None)
    lines = list(seen)
    return lines[:N_TRAIN], lines[N_TRAIN:]


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="ascii")


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_bytes(("\n".join(lines) + "\n").encode("ascii"))


def make_data() -> dict[str, list[str]]:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    train: dict[str, list[str]] = {}
    for name in SKILLS:
        tr, ho = make_split(name)
        assert not set(tr) & set(ho)
        write_lines(DATA_DIR / f"{name}.train.txt", tr)
        write_lines(DATA_DIR / f"{name}.heldout.txt", ho)
        train[name] = tr
    return train


# --------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------


def make_tokenizer(train: dict[str, list[str]]) -> None:
    # Single-threaded training: no dependence on thread scheduling.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [line for name in SKILLS for line in train[name]]
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    if tok.get_vocab_size() != VOCAB_SIZE or tok.token_to_id(EOT) != 0:
        raise RuntimeError(f"tokenizer vocab {tok.get_vocab_size()}, eot id {tok.token_to_id(EOT)}")

    # tokenizer.json comes straight from `tokenizers`; the two small JSON files
    # are written by hand so they do not depend on the transformers version
    # (transformers 5 would write "tokenizer_class": "TokenizersBackend", which
    # 4.x cannot resolve; "PreTrainedTokenizerFast" loads in both).
    TOKENIZER_DIR.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_DIR.iterdir():
        f.unlink()
    tok.save(str(TOKENIZER_DIR / "tokenizer.json"))
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT}
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
        "added_tokens_decoder": {
            "0": {
                "content": EOT,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
        },
    }
    _write_json(TOKENIZER_DIR / "tokenizer_config.json", tok_cfg)
    _write_json(TOKENIZER_DIR / "special_tokens_map.json", special)

    # The saved folder must load offline as a fast tokenizer with eos/pad set.
    from transformers import AutoTokenizer

    fast = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)
    if not fast.is_fast or fast.eos_token_id != 0 or fast.pad_token_id != 0:
        raise RuntimeError("saved tokenizer does not load as expected")

    # Round-trip check on every train line of every skill.
    for name in SKILLS:
        for line in train[name]:
            ids = fast.encode(line, add_special_tokens=False)
            if fast.decode(ids) != line or tok.decode(tok.encode(line).ids) != line:
                raise RuntimeError(f"{name}: round trip failed for {line!r}")


# --------------------------------------------------------------------------
# base model config
# --------------------------------------------------------------------------


def make_config() -> None:
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 256,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "use_cache": True,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
        "dtype": "float32",
        "torch_dtype": "float32",
    }
    _write_json(CONFIG_PATH, cfg)


def main() -> None:
    train = make_data()
    make_tokenizer(train)
    make_config()
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"wrote quickstart assets under {HERE} ({total} bytes)")


if __name__ == "__main__":
    main()
