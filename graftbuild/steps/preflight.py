"""Pre-flight: what can be known about the recipe's models before any node runs, from their
``config.json`` and safetensors headers (or index) alone; no tensor data is read, no torch.

``check`` refuses a source that cannot be a fine-tune of the base (exit 2, naming the source,
the field and both values) at plan time, so that a mismatch is found before hours of training or
packing, not by the pack step at the end: the model type, the number of layers, the hidden size,
whether the head is tied to the embeddings, a smaller vocabulary, a tensor of another shape, or
an integer (quantised) tensor where the base's is float. What is legitimate passes: a larger
vocabulary whose extra rows are added tokens, tensors present in one model only (non-float
buffers such as BERT's ``position_ids``), and a float dtype other than the base's (the delta is
taken in float32 and the pack says so); the pack step handles them. Folders without a
``config.json`` (PEFT adapter folders) are left to the pack step.

``estimates`` gives ``plan`` a rough cost of each node: peak memory, bytes written, and time
where ``docs/BENCHMARKS.md`` measured a rate.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graftbuild.errors import GraftbuildError, UserError, named
from graftbuild.recipe import ids

if TYPE_CHECKING:
    from graftbuild.recipe import Recipe
    from graftbuild.steps.base import Node

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1}
ITEMSIZE |= {"U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CONFIG_FIELDS = (
    ("model_type", "model type"),
    ("num_hidden_layers", "layer count (num_hidden_layers)"),
    ("hidden_size", "hidden size"),
)
# Rates measured by benchmarks/encoder_grafts.py on 2 shared CPU cores (docs/BENCHMARKS.md,
# "Real checkpoints: all-MiniLM-L6-v2"): bytes of the base model's float32 weights per second
# of wall time (pack: 36 MB/s with the default profile, 15-20 with a budget; fuse: ~200 MB/s).
PACK_RATE = 25.0e6
FUSE_RATE = 200.0e6
DEFAULT_PACK_FRACTION = 0.27
"""Default-profile pack size as a fraction of the fp16 delta, when no budget says otherwise
(the same benchmark: 1/3.7; a model whose embedding is a smaller share packs smaller)."""


@dataclass
class ModelFacts:
    """What the headers and config of a model folder say."""

    config: dict[str, Any]
    tensors: dict[str, tuple[str, list[int]]] | None
    """name -> (safetensors dtype, shape); None when the model is not on disk yet."""

    @property
    def nbytes(self) -> int:
        if self.tensors is None:
            return estimated_params(self.config) * 4
        return sum(ITEMSIZE.get(d, 4) * math.prod(s) for d, s in self.tensors.values())

    @property
    def float32_bytes(self) -> int:
        if self.tensors is None:
            return estimated_params(self.config) * 4
        return sum(4 * math.prod(s) for d, s in self.tensors.values() if d in FLOATS)

    @property
    def largest(self) -> int:
        """Float32 bytes of the largest tensor."""
        if self.tensors is None:
            c = self.config
            return 4 * int(c.get("vocab_size", 0)) * int(c.get("hidden_size", 0))
        return max((4 * math.prod(s) for _, s in self.tensors.values()), default=0)


def estimated_params(config: dict[str, Any]) -> int:
    """Parameters of a decoder from its config, for models not built yet (a seeded init)."""
    h, v = int(config.get("hidden_size", 0)), int(config.get("vocab_size", 0))
    inter = int(config.get("intermediate_size", 4 * h))
    layers = int(config.get("num_hidden_layers", 0))
    head = 0 if config.get("tie_word_embeddings", False) else v * h
    return v * h + head + layers * (4 * h * h + 3 * h * inter)


def read_facts(folder: Path) -> ModelFacts | None:
    """A model folder's config and tensor headers; None for a folder with no ``config.json``."""
    from graftbuild.weights.tensors import read_header, weight_files

    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise UserError(f"{cfg_path}: not valid JSON ({e})") from None
    tensors: dict[str, tuple[str, list[int]]] = {}
    for f in weight_files(folder):
        for name, entry in read_header(f).items():
            if name != "__metadata__" and isinstance(entry, dict):
                tensors[name] = (str(entry.get("dtype")), list(entry.get("shape", [])))
    return ModelFacts(config if isinstance(config, dict) else {}, tensors)


def facts_of(node_id: str, folder: Path) -> ModelFacts | None:
    """``read_facts(folder)``, an error in the folder (a malformed header, a FIFO) naming the
    node that reads it, as the engine's visit of that node would."""
    try:
        return read_facts(folder)
    except GraftbuildError as e:
        raise named(node_id, e) from None


def base_facts(recipe: Recipe) -> ModelFacts | None:
    """The base's facts: its folder's, or a seeded init's config (no tensors yet)."""
    base = recipe.base
    if base.path is not None:
        return facts_of(ids.BASE, base.path)
    try:
        config = json.loads(base.config.read_text())  # type: ignore[union-attr]
    except (OSError, ValueError):
        return None  # the init step reports it
    return ModelFacts(config, None) if isinstance(config, dict) else None


def check(recipe: Recipe) -> None:
    """Refuse every source folder whose config or headers do not fit the base (see above)."""
    base = base_facts(recipe)
    if base is None:
        return
    for name, src in recipe.sources.items():
        if src.path is None:
            continue
        facts = facts_of(ids.source(name), src.path)
        if facts is None:
            continue
        where = f"{recipe.path}: sources.{name} ({src.path})"
        _compare_configs(where, base.config, facts.config)
        if base.tensors is not None and facts.tensors is not None:
            _compare_tensors(where, base, facts)


def _compare_configs(where: str, base: dict[str, Any], src: dict[str, Any]) -> None:
    def refuse(what: str, a: Any, b: Any) -> None:
        raise UserError(
            f"{where}: {what} is {b}, the base's is {a}; a source must be a fine-tune of the "
            "base (refused before anything was built)"
        )

    for key, what in CONFIG_FIELDS:
        if key in base and key in src and base[key] != src[key]:
            refuse(what, base[key], src[key])
    tied_a, tied_b = base.get("tie_word_embeddings"), src.get("tie_word_embeddings")
    if tied_a is not None and tied_b is not None and bool(tied_a) != bool(tied_b):
        refuse("tie_word_embeddings (a head tied to the embeddings)", tied_a, tied_b)
    va, vb = base.get("vocab_size"), src.get("vocab_size")
    if isinstance(va, int) and isinstance(vb, int) and vb < va:
        refuse("the vocabulary (vocab_size)", va, vb)


def _compare_tensors(where: str, base: ModelFacts, src: ModelFacts) -> None:
    assert base.tensors is not None and src.tensors is not None
    vocab = base.config.get("vocab_size")
    shapes = []
    for name in sorted(set(base.tensors) & set(src.tensors)):
        (da, sa), (db, sb) = base.tensors[name], src.tensors[name]
        if sa != sb:
            added_rows = bool(sa) and sa[0] == vocab and sb[0] > sa[0] and sa[1:] == sb[1:]
            if not added_rows:
                shapes.append(f"{name} {sa} vs {sb}")
        elif da in FLOATS and db not in FLOATS:
            raise UserError(
                f"{where}: tensor {name!r} has non-float dtype {db} where the base has {da}: a "
                "quantised checkpoint has no meaningful delta; give the fine-tune in a float "
                "dtype (refused before anything was built)"
            )
    if shapes:
        raise UserError(
            f"{where}: does not have the base's architecture (shapes differ: {shapes[:5]}); a "
            "source of another architecture needs a transfer step, not a delta (refused before "
            "anything was built)"
        )


@dataclass
class Estimate:
    peak: int
    """Bytes of memory at the node's peak."""
    written: int
    """Bytes the node writes into the cache."""
    seconds: float | None = None
    """Where a benchmark measured a rate for this kind of node on this kind of machine."""


def estimates(recipe: Recipe, nodes: list[Node]) -> dict[str, Estimate]:
    """A rough estimate of each node's cost, from the base's headers or config."""
    base = base_facts(recipe)
    if base is None:
        return {}
    model, f32, largest = base.nbytes, base.float32_bytes, base.largest
    h = int(base.config.get("hidden_size", 0))
    layers = int(base.config.get("num_hidden_layers", 0))
    out: dict[str, Estimate] = {}
    for n in nodes:
        if n.step == "input":
            out[n.id] = Estimate(0, 0)
        elif n.step in ("init", "teach"):
            out[n.id] = Estimate(f32, model if n.step == "init" else 1 << 20)
        elif n.step in ("sft", "dpo"):
            lora = n.config.get("train", {}).get("lora") is not None
            # weights + gradients + Adam's two moments in float32 (a reference model for DPO)
            peak = f32 + (f32 // 50 if lora else 3 * f32) + (f32 if n.step == "dpo" else 0)
            out[n.id] = Estimate(peak, model)
        elif n.step == "pack":
            profile = n.config.get("profile", {})
            methods = {v.get("method") for v in profile.values() if isinstance(v, dict)}
            exact = methods <= {"exact", None}  # float32 deltas: twice the fp16 delta
            fraction = 2.0 if exact else profile.get("budget") or DEFAULT_PACK_FRACTION
            calib = f32 + layers * 4 * (4 * h * h) if profile.get("calibration") else 0
            written = int(fraction * f32 / 2)
            out[n.id] = Estimate(6 * largest + calib, written, f32 / PACK_RATE)
        elif n.step == "fuse":
            packs = len(n.config.get("packs", []))
            out[n.id] = Estimate((packs + 3) * largest, model, f32 / FUSE_RATE)
        elif n.step == "bundle":
            packs = len(n.config.get("packs", []))
            out[n.id] = Estimate(f32 + 2 * largest, model + int(packs * 0.1 * f32 / 2))
        elif n.step == "eval":
            out[n.id] = Estimate(f32 + 64 * largest // max(h, 1), 4096)
        elif n.step == "release":
            out[n.id] = Estimate(1 << 20, 1 << 16)
    return out
