"""``pack``: a source's delta against the base, compressed module by module into a SkillPack.

Streams: each ``-j`` worker holds one tensor of the base and one of the source at a time, and
parts are written in name order whatever order the workers finish in.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from graftbuild.errors import UserError
from graftbuild.recipe import ids
from graftbuild.skillpack.format import PACK_FILE
from graftbuild.steps.base import Node, StepContext

if TYPE_CHECKING:
    import torch

    from graftbuild.recipe import Recipe

_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
# Float buffers older transformers saved and newer ones omit (GPT-2's and GPT-NeoX's causal
# masks, rotary inverse frequencies): when the source lacks one, the base's is carried.
_FLOAT_BUFFER = re.compile(r"(^|\.)((attn|attention)\.(bias|masked_bias)|rotary_emb\.inv_freq)$")


class PackStep:
    name: ClassVar[str] = "pack"
    # 2: lowrank encodes small rank budgets with a randomized SVD
    # 3: GPTQ rounds to its grid by division, as RTN does (codes differ at exact ties)
    # 4: zero deltas stored as `zero`; buffers skipped; added token rows; LoRA adapter sources;
    #    a lossless (all-exact) pack of a source is a reference pack (no model-sized copy)
    version: ClassVar[int] = 4
    uses_accelerator: ClassVar[bool] = True
    forwards: ClassVar[tuple[str, ...]] = ("source",)
    """Inputs that a node reading a pack also receives (as ``pack.N.source``): a reference
    pack's deltas are read from its source. Not part of the reader's key: the pack's bytes
    name the source's weights by content hash."""

    def nodes(self, recipe: Recipe, out: Path) -> list[Node]:
        """``pack:NAME`` of every source: its delta against the base (or its parent's graft),
        compressed by its profile; the profile's codecs' versions are part of the key."""
        nodes = []
        for name, src in recipe.sources.items():
            profile = recipe.profile(src.compression)
            normalised = profile.normalised()
            calib = {"calibration": profile.calibration.data} if profile.calibration else {}
            if profile.target is not None:
                calib["target"] = profile.target.data
            parent = {"parent": ids.start(src.parent)} if src.parent else {}
            nodes.append(
                Node(
                    ids.pack(name),
                    "pack",
                    config={"profile": normalised},
                    deps={"base": ids.BASE, "source": recipe.source_model(name)} | parent,
                    files=calib,
                    labels={
                        "config.profile": f"compression profile '{src.compression}' changed",
                        "file:calibration": f"calibration data of '{src.compression}' changed",
                        "file:target": f"held-out data of '{src.compression}' target changed",
                        "dep:source": f"source '{name}' weights changed",
                        "dep:base": "base model changed",
                        "dep:parent": f"parent model {ids.graft(src.parent or '')} changed",
                    },
                    output=out / "packs" / name,
                    components=codec_components(normalised),
                )
            )
        return nodes

    def run(self, ctx: StepContext) -> None:

        from graftbuild.compress.budget import seeded
        from graftbuild.compress.codecs import Encoded
        from graftbuild.compress.codecs.zero import is_zero
        from graftbuild.compress.gptq import Calibration
        from graftbuild.compress.roles import classify
        from graftbuild.skillpack.format import ADDED_ROWS
        from graftbuild.skillpack.writer import PackWriter, encode_with, parse, plan_layout
        from graftbuild.weights.memory import release_freed_tensors
        from graftbuild.weights.parallel import ordered_map
        from graftbuild.weights.tensors import ModelWeights, all_finite

        release_freed_tensors()
        profile = ctx.config["profile"]
        placement = ctx.placement
        # A chained source's delta is taken against its parent's grafted model (``parent``); the
        # header still names the root base (what fusing adds it to) and records the parent.
        reference = "parent" if "parent" in ctx.inputs else "base"
        cal = profile.get("calibration")
        hessians: dict[str, Any] = {}
        if cal is not None:
            from graftbuild.compress.calibration import collect_statistics

            # activations of the model the delta is added to: the base, or the parent's graft
            hessians = collect_statistics(
                ctx.inputs[reference],
                ctx.files["calibration"],
                cal["samples"],
                cal["seq_len"],
                cal["field"],
                placement,
            )
        # The header names the base (fusing checks it) but not the source folder's hash: a pack
        # is a function of the delta alone, so a source change that leaves the weights as they
        # were yields the same bytes and the fuse below is reused (early cutoff).
        header: dict[str, Any] = {"base": ctx.input_hashes["base"]}
        if reference == "parent":
            header["parent"] = ctx.input_hashes["parent"]
        with (
            ModelWeights(ctx.inputs[reference]) as base,
            open_source(ctx.inputs["source"], base, ctx) as src,
        ):
            # Non-float tensors (BERT's int64 position_ids, ...) are buffers, not weights: the
            # fused model carries the base's, and they are never delta'd.
            names = [
                n
                for n in base.names()
                if base.infos[n].dtype in _DTYPE_NAMES and not src.carried(n)
            ]
            note_buffers(base, ctx, [n for n in base.names() if src.carried(n)])
            vocab = src.vocabulary(ctx.inputs[reference])
            if vocab is not None:
                header["vocab"] = vocab
            # each tensor's role and codec, decided (and its spec validated) once
            roles = {n: classify(n, len(base.infos[n].shape), profile["roles"]) for n in names}
            specs = {name: seeded(name, profile[roles[name]]) for name in names}
            if profile.get("target") is not None:
                specs = search_target(ctx, base, src, reference, specs, roles, header, hessians)
            elif profile.get("budget") is not None:
                header["budget"] = profile["budget"]
                fisher: dict[str, Any] = {}
                if cal is not None:
                    from graftbuild.compress.calibration import collect_fisher

                    fisher = collect_fisher(
                        ctx.inputs[reference],
                        ctx.files["calibration"],
                        cal["samples"],
                        cal["seq_len"],
                        cal["field"],
                        placement,
                    )
                if fisher:  # its final value, rounded alike, is known after the allocation
                    header["allocation"] = {
                        "chosen": "loss-aware",
                        "calibration_loss": {"loss-aware": 9.87654, "uniform": 9.87654},
                    }
                specs, uniform = allocate_budget(
                    ctx,
                    base,
                    src,
                    specs,
                    float(profile["budget"]),
                    hessians,
                    fisher,
                    roles,
                    header,
                    list(profile.get("mix") or []),
                )
                del fisher
                if uniform is not None and cal is not None:
                    specs = pick_allocation(ctx, base, src, reference, cal, specs, uniform, header)
            else:
                specs = {n: low_rank_spec(spec, src.rank(n)) for n, spec in specs.items()}
            parsed = {name: parse(spec) for name, spec in specs.items()}
            if (
                REFERENCE_LOSSLESS
                and reference == "base"
                and isinstance(src, _ModelSource)
                and not src.rows
                and vocab is None
                and lossless(parsed)
            ):
                # a model folder's lossless delta: named, not copied (no added rows: every
                # delta is source - base of one shape)
                write_reference(ctx, base, src, names, roles, header)
                return
            zero_codec = parse({"method": "zero"})

            # When every tensor's entry is known before encoding (exact codec), the pack's header
            # is written first and each tensor goes straight to its place, in the file's order.
            # A zero delta's entry is known too once the tensor is compared with the base's.
            layout: dict[str, Any] | None = {}
            zero: set[str] | None = None
            for name in names:
                info = base.infos[name]
                planned = plan_layout(
                    parsed[name], roles[name], info.shape, _DTYPE_NAMES[info.dtype]
                )
                if planned is None or src.added_rows(name):
                    layout = None
                    break
                layout[name] = planned  # type: ignore[index]
            if layout is not None:
                zero = {n for n in names if src.unchanged(n)}
                for n in zero:
                    info = base.infos[n]
                    dtype = _DTYPE_NAMES[info.dtype]
                    layout[n] = plan_layout(zero_codec, roles[n], info.shape, dtype)

            def encode(name: str) -> tuple:
                """One tensor's delta, encoded (runs on a -j worker; reads only its tensor)."""
                shape = base.infos[name].shape
                if zero is not None and name in zero:
                    return name, "zero", zero_codec[1], shape, Encoded({}), 0
                delta = src.delta(name, placement)
                if not all_finite(delta):
                    raise UserError(f"{src.folder}: tensor {name!r}: NaN or Inf in the delta")
                added = src.added(name)
                codec, params = parsed[name]
                if zero is None and is_zero(delta):
                    # the tensor is as the base has it: its entry and no data
                    codec, params = zero_codec
                calibration = None
                h = hessians.get(name)
                if h is not None and h.ndim == 2 and codec.uses_calibration:
                    calibration = Calibration(h, cal["damp"], cal["act_order"])
                encoded = encode_with(codec, params, delta, calibration)
                del delta
                rows = 0
                if added is not None:
                    # new token rows: their delta is against nothing, stored exactly
                    encoded.parts[ADDED_ROWS] = added
                    rows = int(added.shape[0])
                    shape = (shape[0] + rows, *shape[1:])
                return name, codec.name, params, tuple(shape), encoded, rows

            with (
                PackWriter(ctx.out / PACK_FILE, header, layout) as writer,
                ctx.progress.task(f"pack {ctx.node_id}", len(names), unit="tensor") as advance,
            ):
                order = writer.order if writer.order is not None else names
                sizes = {n: base.infos[n].nbytes for n in names}
                work = ordered_map(
                    encode, order, ctx.settings.jobs, sizes.__getitem__, max(sizes.values())
                )
                unchanged = 0
                for name, codec, params, shape, encoded, rows in work:
                    dtype = _DTYPE_NAMES[base.infos[name].dtype]
                    writer.add(
                        name, roles[name], codec, params, shape, dtype, encoded, added_rows=rows
                    )
                    unchanged += codec == "zero" and not rows
                    written = sum(t.numel() * t.element_size() for t in encoded.parts.values())
                    del encoded  # not alive while the next one is computed
                    advance(1, bytes=written)
            if unchanged:
                ctx.progress.log(
                    f"note: {ctx.node_id}: {unchanged} of {len(names)} tensors are unchanged "
                    "from the base (stored as zero deltas, no data)"
                )


class _ModelSource:
    """A full fine-tuned checkpoint: Δ = source − base, tensor by tensor (added token rows
    apart)."""

    def __init__(self, folder: Path, base: Any, ctx: StepContext) -> None:
        from graftbuild.weights.tensors import ModelWeights

        self.folder = Path(folder)
        self.base = base
        self.ctx = ctx
        self.weights = ModelWeights(self.folder)
        try:
            self.rows = check_same_layout(base, self.weights)
            note_dtype_differences(base, self.weights, ctx)
        except BaseException:
            self.weights.close()
            raise

    def __enter__(self) -> _ModelSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.weights.close()

    def vocabulary(self, base_folder: Path) -> dict[str, Any] | None:
        """The pack header's ``vocab`` when the source adds tokens, else None."""
        from graftbuild.weights.vocab import added_tokens

        extra = set(self.rows.values())
        tokens = added_tokens(base_folder, self.folder, required=bool(extra))
        if tokens is None:
            self.ctx.progress.log(
                f"note: {self.ctx.node_id}: the tokenizers of the base and {self.folder} differ "
                "and one does not load; no tokens are carried from the source"
            )
            return None
        if not tokens:
            if extra:
                raise UserError(
                    f"{self.folder}: {sorted(self.rows)[0]!r} has {max(extra)} rows more than "
                    "the base's, but the source's tokenizer adds no tokens; save the "
                    "fine-tune's tokenizer with it"
                )
            return None
        base_rows = self._base_rows()
        k = max(extra) if extra else 0
        beyond = [t for t in tokens if t["id"] >= base_rows + k]
        if beyond:
            raise UserError(
                f"{self.folder}: token {beyond[0]['content']!r} has id {beyond[0]['id']} but "
                f"the embeddings have {base_rows + k} rows"
            )
        return {"base_rows": base_rows, "added_rows": k, "tokens": tokens}

    def _base_rows(self) -> int:
        """The base's embedding rows: those of a widened tensor, else the config's
        ``vocab_size``, else the word embedding's rows."""
        if self.rows:
            return int(self.base.infos[sorted(self.rows)[0]].shape[0])
        import json

        try:
            cfg = json.loads((self.base.folder / "config.json").read_text())
            size = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
            if isinstance(size, int) and size > 0:
                return size
        except (OSError, ValueError, AttributeError):
            pass
        words = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings)\.")
        shapes = [i.shape[0] for n, i in self.base.infos.items() if words.search(n)]
        if not shapes:
            raise UserError(f"{self.base.folder}: no embedding matrix found to hold added tokens")
        return int(max(shapes))

    def added_rows(self, name: str) -> int:
        return self.rows.get(name, 0)

    def carried(self, name: str) -> bool:
        """A float buffer of the base the source did not save: carried, not packed."""
        return name not in self.weights.infos

    def unchanged(self, name: str) -> bool:
        """The source stores ``name`` as the base does (equal values, same dtype and shape)."""
        import torch

        a, b = self.base.infos[name], self.weights.infos[name]
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        return bool(torch.equal(self.base.map(name), self.weights.map(name)))

    def delta(self, name: str, placement: Any) -> torch.Tensor:
        import torch

        from graftbuild.weights.memory import empty_like

        # both read through copy-on-write maps (no copy of the stored bytes), the delta
        # into a fresh buffer
        b = placement.put(self.base.map(name), torch.float32)
        x = placement.put(self.weights.map(name), torch.float32)
        if name in self.rows:
            x = x[: b.shape[0]]
        delta = torch.sub(x, b, out=empty_like(x) if x.is_contiguous() else None)
        return delta

    def added(self, name: str) -> torch.Tensor | None:
        """The rows beyond the base's (new tokens'), float32 on the CPU, or None."""
        import torch

        if name not in self.rows:
            return None
        n = self.base.infos[name].shape[0]
        return self.weights.get(name)[n:].to(torch.float32).contiguous()

    def rank(self, name: str) -> int | None:
        return None


class _AdapterSource:
    """A PEFT LoRA adapter folder: Δ = B·A·scale, unmerged (weights/adapter.py)."""

    def __init__(self, folder: Path, base: Any, ctx: StepContext) -> None:
        from graftbuild.weights.adapter import AdapterDeltas

        self.folder = Path(folder)
        self.base = base
        self.adapter = AdapterDeltas(self.folder, base)
        self._touched = self.adapter.touched()
        ctx.progress.log(f"note: {ctx.node_id}: source is a {self.adapter.describe()}")

    def __enter__(self) -> _AdapterSource:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def vocabulary(self, base_folder: Path) -> dict[str, Any] | None:
        return None

    def added_rows(self, name: str) -> int:
        return 0

    def carried(self, name: str) -> bool:
        return False

    def unchanged(self, name: str) -> bool:
        return name not in self._touched

    def delta(self, name: str, placement: Any) -> torch.Tensor:
        return placement.put(self.adapter.delta(name, self.base))

    def added(self, name: str) -> torch.Tensor | None:
        return None

    def rank(self, name: str) -> int | None:
        return self.adapter.rank(name)


def open_source(folder: Path, base: Any, ctx: StepContext) -> _ModelSource | _AdapterSource:
    """The source's deltas against ``base``: a model folder, or a PEFT LoRA adapter folder."""
    from graftbuild.weights.adapter import is_adapter

    if is_adapter(folder):
        return _AdapterSource(folder, base, ctx)
    return _ModelSource(folder, base, ctx)


def low_rank_spec(spec: dict[str, Any], rank: int | None) -> dict[str, Any]:
    """A LoRA delta is already low-rank: a role compressed by SVD (``lowrank``, ``mixed``)
    stores it as ``lowrank`` at the adapter's rank (exact up to the factors' dtype) instead of
    spending a band structure sized for a full-rank delta on it. Other codecs are kept."""
    if rank is None or spec.get("method") not in ("lowrank", "mixed"):
        return spec
    dtype = spec.get("dtype", "float16") if spec.get("method") == "lowrank" else "float16"
    return {"method": "lowrank", "energy": None, "rank": rank, "max_rank": None, "dtype": dtype}


def note_buffers(base: Any, ctx: StepContext, carried: list[str]) -> None:
    """Say once that the base's buffers (non-float tensors, and float buffers the source did
    not save) are carried, not packed."""
    buffers = sorted(
        {n for n, i in base.infos.items() if i.dtype not in _DTYPE_NAMES} | set(carried)
    )
    if buffers:
        ctx.progress.log(
            f"note: {ctx.node_id}: {len(buffers)} tensors are buffers, not weights "
            f"(e.g. {buffers[0]}): the fused model carries the base's, they are not packed"
        )


def pick_allocation(
    ctx: StepContext,
    base: Any,
    src: Any,
    reference: str,
    cal: dict[str, Any],
    loss_aware: dict[str, dict],
    uniform: dict[str, dict],
    header: dict[str, Any],
) -> dict[str, dict]:
    """The loss-aware or the uniform allocation, whichever grafts with the lower calibration
    loss (recorded in ``header``)."""
    candidates = {"loss-aware": loss_aware, "uniform": uniform}
    chosen, losses = choose_by_loss(ctx, base, src, reference, cal, candidates)
    header["allocation"] = {"chosen": chosen, "calibration_loss": losses}
    ctx.progress.log(
        f"{ctx.node_id}: budget allocation {chosen} (calibration loss "
        + ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
        + ")"
    )
    return candidates[chosen]


def search_target(
    ctx: StepContext,
    base: Any,
    src: Any,
    reference: str,
    specs: dict[str, dict],
    roles: dict[str, str],
    header: dict[str, Any],
    hessians: dict[str, Any],
) -> dict[str, dict]:
    """Specs of the smallest budget whose graft keeps the profile's ``target.keep`` of the
    fine-tune's improvement on the target's held-out text: ``keep = (L_base − L_graft) /
    (L_base − L_source)``, budgets bisected in log space between 1/256 and the profile's
    ``budget`` (default 1/2), each evaluation recorded in the header. A build failure naming
    the pack and the best share reached when even the largest budget falls short."""
    import math

    from graftbuild.compress.calibration import calibration_loss, collect_fisher
    from graftbuild.errors import BuildError

    profile = ctx.config["profile"]
    target, cal = profile["target"], profile.get("calibration")
    data = ctx.files["target"]

    def loss(deltas: Any) -> float:
        return calibration_loss(
            ctx.inputs[reference],
            data,
            target["samples"],
            target["seq_len"],
            deltas,
            target["field"],
            ctx.placement,
        )

    loss_base = loss([])
    loss_source = loss((name, delta) for name, _, delta in iter_deltas(base, src))
    gain = loss_base - loss_source
    if not gain > 0:
        raise BuildError(
            f"{ctx.node_id}: target: the source does not lower the loss on {data} (base "
            f"{loss_base:.4f}, source {loss_source:.4f}); a quality target needs a fine-tune "
            "that improves on its held-out data"
        )
    fisher: dict[str, Any] = {}
    if cal is not None:
        fisher = collect_fisher(
            ctx.inputs[reference],
            ctx.files["calibration"],
            cal["samples"],
            cal["seq_len"],
            cal["field"],
            ctx.placement,
        )
    evaluations: list[dict[str, float]] = []
    header["target"] = {"keep": target["keep"], "evaluations": evaluations}
    mix = list(profile.get("mix") or [])
    cache: dict[str, Any] = {}

    allocations: dict[float, Any] = {}

    def at(budget: float) -> tuple[float, dict[str, dict]]:
        header["budget"] = round(budget, 6)
        chosen, uniform = allocate_budget(
            ctx, base, src, specs, budget, hessians, fisher, roles, header, mix, cache
        )
        if uniform is not None and cal is not None:
            chosen = pick_allocation(ctx, base, src, reference, cal, chosen, uniform, header)
            allocations[budget] = header["allocation"]
        graft = loss(decode_all(base, src, chosen))
        kept = (loss_base - graft) / gain
        evaluations.append({"budget": round(budget, 6), "keep": round(kept, 6)})
        ctx.progress.log(f"{ctx.node_id}: target: budget {budget:.5f} keeps {kept:.1%}")
        return kept, chosen

    hi = float(profile.get("budget") or 0.5)
    lo = 1 / 256
    kept, best = at(hi)
    if kept < target["keep"]:
        raise BuildError(
            f"{ctx.node_id}: target keep = {target['keep']} not met: the best share of the "
            f"improvement on {data} is {kept:.1%}, at budget {hi} (the largest tried); raise "
            "`budget` or lower `target.keep`"
        )
    best_budget = hi
    for _ in range(int(target["evaluations"]) - 1):
        if hi / lo < 1.15:
            break
        mid = math.sqrt(lo * hi)
        kept, chosen = at(mid)
        if kept >= target["keep"]:
            hi, best, best_budget = mid, chosen, mid
        else:
            lo = mid
    header["budget"] = round(best_budget, 6)
    header["target"]["budget"] = round(best_budget, 6)
    if best_budget in allocations:
        header["allocation"] = allocations[best_budget]
    return best


def decode_all(base: Any, src: Any, specs: dict[str, dict]) -> Iterator[tuple[str, Any]]:
    """(name, decoded delta) of every tensor under ``specs``, one at a time."""
    from graftbuild.compress.codecs import get_codec
    from graftbuild.skillpack.writer import encode_tensor

    for name, _dtype, delta in iter_deltas(base, src):
        codec, _, enc = encode_tensor(delta, specs[name])
        yield name, get_codec(codec).decode(enc.parts, enc.meta, tuple(delta.shape))


REFERENCE_LOSSLESS = True
"""Lossless packs of a source (against the base) are written as reference packs. False: as
stored exact packs, as before version 4 (tests compare the two; the result is the same bytes)."""


def lossless(parsed: dict[str, tuple[Any, Any]]) -> bool:
    """Every tensor's codec is ``exact``: the delta is source - base, nothing lost."""
    return bool(parsed) and all(codec.name == "exact" for codec, _ in parsed.values())


def write_reference(
    ctx: StepContext,
    base: Any,
    src: _ModelSource,
    names: list[str],
    roles: dict[str, str],
    header: dict[str, Any],
) -> None:
    """A reference pack: the base's hash, the source's weight files by content hash, and each
    tensor's entry, with no payload; the fuse computes each delta from base and source. Its
    bytes change exactly when the source's weight files do (a new README leaves them: early
    cutoff), so a fuse keyed by them is keyed by the source's weights."""
    from graftbuild.cache.hashing import combine, hash_known
    from graftbuild.skillpack.writer import PackWriter, reference_layout

    folder = Path(src.folder)
    # hashed by the engine already in this process (the stat cache's test), else read here
    files = {p.relative_to(folder).as_posix(): hash_known(p) for p in src.weights.files}
    header = header | {"reference": {"source": combine(files), "files": files}}
    layout = {
        n: reference_layout(roles[n], tuple(base.infos[n].shape), _DTYPE_NAMES[base.infos[n].dtype])
        for n in names  # float weights the source has (buffers are carried from the base)
    }
    with ctx.progress.task(f"pack {ctx.node_id}", 1) as advance:
        with PackWriter(ctx.out / PACK_FILE, header, layout):
            pass
        advance(1)


def iter_deltas(base: Any, src: Any) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(name, original dtype name, float32 delta) of every float tensor, one at a time (a
    source's added token rows apart: they are stored exactly)."""
    from graftbuild.weights.placement import Placement
    from graftbuild.weights.tensors import all_finite

    cpu = Placement.of(None)
    for name in base.names():
        info = base.infos[name]
        if info.dtype not in _DTYPE_NAMES or src.carried(name):
            continue  # a buffer: carried from the base, never delta'd
        delta = src.delta(name, cpu)
        if not all_finite(delta):
            raise UserError(f"{src.folder}: tensor {name!r}: NaN or Inf in the delta")
        yield name, _DTYPE_NAMES[info.dtype], delta


def allocate_budget(
    ctx: StepContext,
    base: Any,
    src: Any,
    specs: dict[str, dict],
    budget: float,
    statistics: dict[str, Any],
    fisher: dict[str, Any] | None = None,
    roles: dict[str, str] | None = None,
    header: dict[str, Any] | None = None,
    mix: list[str] | None = None,
    cache: dict[str, Any] | None = None,
) -> tuple[dict[str, dict], dict[str, dict] | None]:
    """Per-tensor specs fitting ``budget`` × the fp16 delta, header included (a first pass over
    the deltas): with calibration (``fisher``), the loss-aware allocation (compress/budget.py:
    each tensor's error weighed by its Fisher-weighted delta energy, within it by the input
    statistics, a floor per tensor) and GraftLLM's uniform split to check it against; without,
    the uniform split and None. ``mix``: codecs a matrix may take instead of its role's method
    where they cost less loss per byte."""
    from graftbuild.compress.budget import (
        FLOOR_SHARE,
        allocate,
        fp16_delta_nbytes,
        loss_aware_profile,
        uniform_floors,
        uniform_split,
    )
    from graftbuild.compress.codecs.base import FixedRate
    from graftbuild.compress.codecs.zero import is_zero
    from graftbuild.skillpack.writer import estimate_header_nbytes

    profiles: list[Any] = [] if cache is None else cache.setdefault("profiles", [])
    with ctx.progress.task(f"budget {ctx.node_id}", 0 if profiles else len(specs)) as advance:
        for name, _dtype, delta in [] if profiles else iter_deltas(base, src):
            if is_zero(delta):  # stored as a zero delta whatever its spec: nothing to spend
                profiles.append(FixedRate(name, specs[name], tuple(delta.shape), 0))
                advance(1)
                continue
            d = ctx.placement.put(delta)
            weight = None
            if fisher:
                f = fisher.get(name)
                weight = float((f.to(d.device) * d.pow(2)).sum()) if f is not None else 0.0
            profiles.append(
                loss_aware_profile(name, d, specs[name], statistics.get(name), weight, mix or [])
            )
            advance(1)
    total = int(budget * fp16_delta_nbytes([p.shape for p in profiles]))
    dtypes = {n: _DTYPE_NAMES[base.infos[n].dtype] for n in base.names()}

    def loss_aware(payload: int) -> dict[str, dict]:
        return allocate(profiles, payload, uniform_floors(profiles, payload, FLOOR_SHARE))

    def uniform(payload: int) -> dict[str, dict]:
        return uniform_split(profiles, payload)

    def header_of(chosen: dict[str, dict]) -> int:
        return estimate_header_nbytes(
            header or {},
            {
                p.name: (
                    (roles or {}).get(p.name, "other"),
                    chosen[p.name],
                    p.shape,
                    dtypes[p.name],
                )
                for p in profiles
            },
            total,
        )

    uniform_specs = fit_header(uniform, total, header_of)
    if not fisher:
        return uniform_specs, None
    return fit_header(loss_aware, total, header_of), uniform_specs


def fit_header(split: Any, total: int, header_of: Any) -> dict[str, dict]:
    """``split(payload)``'s specs for the largest payload whose header still fits in ``total``.

    The budget bounds the whole file: the header is estimated for the chosen specs and the
    payload target lowered by it. Bisect the least reserve whose specs' header fits in it (more
    payload means more bands and parts, hence more header)."""
    hi = header_of(split(total))
    best = split(max(0, total - hi))
    if header_of(best) > hi:  # cannot happen unless the header grows as the payload shrinks
        return best
    lo = 0
    while hi - lo > max(64, hi // 256):
        mid = (lo + hi) // 2
        chosen = split(max(0, total - mid))
        if header_of(chosen) <= mid:
            hi, best = mid, chosen
        else:
            lo = mid
    return best


def choose_by_loss(
    ctx: StepContext,
    base: Any,
    src: Any,
    reference: str,
    cal: dict[str, Any],
    candidates: dict[str, dict[str, dict]],
) -> tuple[str, dict[str, float]]:
    """The candidate allocation whose graft has the least loss on the calibration text (each
    encoded and decoded tensor by tensor): the loss-aware allocation is kept only where it
    does better than the uniform split, so a budget never does worse than the uniform split
    on that text. Returns the winner and every candidate's loss."""
    from graftbuild.compress.calibration import calibration_loss

    decoded = partial(decode_all, base, src)

    losses = {
        label: round(
            calibration_loss(
                ctx.inputs[reference],
                ctx.files["calibration"],
                cal["samples"],
                cal["seq_len"],
                decoded(specs),
                cal["field"],
                ctx.placement,
            ),
            6,
        )
        for label, specs in candidates.items()
    }
    return min(losses, key=lambda k: (losses[k], k != "loss-aware")), losses


def check_same_layout(base: object, src: object) -> dict[str, int]:
    """A source must have the base's weights, names and shapes (else: a transfer step), except
    for buffers (non-float tensors, carried from the base) and rows added after the base's
    (new tokens' embedding and head rows). Returns tensor -> number of added rows."""
    from graftbuild.weights.tensors import ModelWeights

    assert isinstance(base, ModelWeights) and isinstance(src, ModelWeights)
    floats = {n for n, i in base.infos.items() if i.dtype in _DTYPE_NAMES}
    src_floats = {n for n, i in src.infos.items() if i.dtype in _DTYPE_NAMES}
    # float buffers (GPT-2's causal mask `attn.bias`, ...) that one side saved and the other not
    only_base = sorted(n for n in floats - set(src.infos) if not _FLOAT_BUFFER.search(n))
    only_src = sorted(n for n in src_floats - set(base.infos) if not _FLOAT_BUFFER.search(n))
    rows: dict[str, int] = {}
    shapes = []
    for n in sorted(floats & set(src.infos)):
        a, b = base.infos[n].shape, src.infos[n].shape
        if a == b:
            continue
        if len(a) == len(b) and a and a[1:] == b[1:] and b[0] > a[0]:
            rows[n] = b[0] - a[0]  # rows added after the base's: new tokens
        else:
            shapes.append(f"{n} {list(a)} vs {list(b)}")
    if len(set(rows.values())) > 1:
        shapes += [f"{n}: {k} rows added" for n, k in sorted(rows.items())]
    if only_base or only_src or shapes:
        parts = []
        if only_base:
            parts.append(f"missing from source: {only_base[:5]}")
        if only_src:
            parts.append(f"not in base: {only_src[:5]}")
        if shapes:
            parts.append(f"shapes differ: {shapes[:5]}")
        raise UserError(
            f"{src.folder} does not have the base's architecture ({'; '.join(parts)}); a source "
            "of another architecture needs a transfer step, not a delta"
        )
    return rows


def note_dtype_differences(base: object, src: object, ctx: StepContext) -> None:
    """A source may store its weights in another float dtype than the base (a bf16 fine-tune of
    an fp32 base): the delta is taken in float32 and the pack records the base's dtype, and the
    build says so. A non-float source tensor is refused."""
    from graftbuild.weights.tensors import ModelWeights

    assert isinstance(base, ModelWeights) and isinstance(src, ModelWeights)
    differ = sorted(
        n
        for n in base.infos
        if n in src.infos
        and base.infos[n].dtype in _DTYPE_NAMES
        and src.infos[n].dtype != base.infos[n].dtype
    )
    if not differ:
        return
    bad = [n for n in differ if src.infos[n].dtype not in _DTYPE_NAMES]
    if bad:
        raise UserError(
            f"{src.folder}: tensor {bad[0]!r} has non-float dtype {src.infos[bad[0]].dtype} "
            f"where the base has {base.infos[bad[0]].dtype}"
        )
    pairs = sorted({(src.infos[n].dtype, base.infos[n].dtype) for n in differ})
    ctx.progress.log(
        f"note: {ctx.node_id}: {len(differ)} source tensors are stored as "
        f"{', '.join(f'{a} where the base has {b}' for a, b in pairs)} (e.g. {differ[0]}); "
        "deltas are taken in float32 and fused back into the base's dtype"
    )


def codec_components(profile: dict[str, Any]) -> dict[str, int]:
    """``codec:NAME`` -> version of every codec a (normalised) profile names (roles and
    ``mix``), and the budget allocator's version for a profile with a budget."""
    from graftbuild.compress.codecs import get_codec
    from graftbuild.compress.roles import ROLES

    # `zero` stores any all-zero delta, whatever the profile
    methods = {profile[role]["method"] for role in ROLES if role in profile} | {"zero"}
    methods |= set(profile.get("mix") or [])
    out = {f"codec:{m}": get_codec(m).version for m in sorted(methods)}
    if profile.get("budget") is not None or profile.get("target") is not None:
        # 2: uniform split without calibration, loss-aware with; the budget bounds the file
        out["allocator:budget"] = BUDGET_ALLOCATOR_VERSION
    return out


BUDGET_ALLOCATOR_VERSION = 2
"""Of ``compress/budget.py`` as the pack step uses it: in the key of packs with a budget only."""
