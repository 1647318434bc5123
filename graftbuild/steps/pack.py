"""``pack``: a source's delta against the base, compressed module by module into a SkillPack.

Streams: each ``-j`` worker holds one tensor of the base and one of the source at a time, and
parts are written in name order whatever order the workers finish in.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from graftbuild.errors import UserError
from graftbuild.recipe import ids
from graftbuild.skillpack.format import PACK_FILE
from graftbuild.steps.base import Node, StepContext
from graftbuild.steps.sources import (
    DTYPE_NAMES,
    ModelSource,
    low_rank_spec,
    note_buffers,
    open_source,
)

if TYPE_CHECKING:
    import torch

    from graftbuild.recipe import Recipe



class PackStep:
    name: ClassVar[str] = "pack"
    # 2: lowrank encodes small rank budgets with a randomized SVD
    # 3: GPTQ rounds to its grid by division, as RTN does (codes differ at exact ties)
    # 4: zero deltas stored as `zero`; buffers skipped; added token rows; LoRA adapter sources;
    #    a lossless (all-exact) pack of a source is a reference pack (no model-sized copy)
    # 5: stored packs are SkillPack 3.0 (one byte run per tensor: a smaller header)
    version: ClassVar[int] = 5
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
        from graftbuild.compress.codecs import Encoded, svd_memo
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
            hessians = on_calibration(ctx, reference, collect_statistics)
        # The header names the base (fusing checks it) but not the source folder's hash: a pack
        # is a function of the delta alone, so a source change that leaves the weights as they
        # were yields the same bytes and the fuse below is reused (early cutoff).
        header: dict[str, Any] = {"base": ctx.input_hashes["base"]}
        searched = profile.get("budget") is not None or profile.get("target") is not None
        if reference == "parent":
            header["parent"] = ctx.input_hashes["parent"]
        with (
            ModelWeights(ctx.inputs[reference]) as base,
            open_source(ctx.inputs["source"], base, ctx) as src,
            # a budget pack decomposes each matrix up to 4 times: rate, two candidates, pack
            svd_memo() if searched else nullcontext(),
        ):
            # Non-float tensors (BERT's int64 position_ids, ...) are buffers, not weights: the
            # fused model carries the base's, and they are never delta'd.
            names = [
                n
                for n in base.names()
                if base.infos[n].dtype in DTYPE_NAMES and not src.carried(n)
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

                    fisher = on_calibration(ctx, reference, collect_fisher)
                if fisher:  # its final value, rounded alike, is known after the allocation
                    header["allocation"] = ALLOCATION_PLACEHOLDER
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
                and isinstance(src, ModelSource)
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
                    parsed[name], roles[name], info.shape, DTYPE_NAMES[info.dtype]
                )
                if planned is None or src.added_rows(name):
                    layout = None
                    break
                layout[name] = planned  # type: ignore[index]
            if layout is not None:
                zero = {n for n in names if src.unchanged(n)}
                for n in zero:
                    info = base.infos[n]
                    dtype = DTYPE_NAMES[info.dtype]
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
                placement.warm_up()  # before -j threads make their first linalg calls
                work = ordered_map(
                    encode, order, ctx.settings.jobs, sizes.__getitem__, max(sizes.values())
                )
                unchanged = 0
                for name, codec, params, shape, encoded, rows in work:
                    dtype = DTYPE_NAMES[base.infos[name].dtype]
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


ALLOCATION_PLACEHOLDER = {
    "chosen": "loss-aware",
    "calibration_loss": {"loss-aware": 9.87654, "uniform": 9.87654},
}
"""Stands in the header while the budget's header size is estimated: within a few bytes of the
entry ``pick_allocation`` writes in its place after the allocation (the estimate has slack)."""


def on_calibration(ctx: StepContext, reference: str, collect: Any) -> Any:
    """``collect`` (``collect_statistics``, ``collect_fisher``) run over the profile's calibration
    text on ``reference``, the model the delta is added to (the base, or the parent's graft)."""
    cal = ctx.config["profile"]["calibration"]
    return collect(
        ctx.inputs[reference],
        ctx.files["calibration"],
        cal["samples"],
        cal["seq_len"],
        cal["field"],
        ctx.placement,
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
        fisher = on_calibration(ctx, reference, collect_fisher)
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
    src: ModelSource,
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
        n: reference_layout(roles[n], tuple(base.infos[n].shape), DTYPE_NAMES[base.infos[n].dtype])
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
        if info.dtype not in DTYPE_NAMES or src.carried(name):
            continue  # a buffer: carried from the base, never delta'd
        delta = src.delta(name, cpu)
        if not all_finite(delta):
            raise UserError(f"{src.folder}: tensor {name!r}: NaN or Inf in the delta")
        yield name, DTYPE_NAMES[info.dtype], delta


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
    dtypes = {n: DTYPE_NAMES[base.infos[n].dtype] for n in base.names()}

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
