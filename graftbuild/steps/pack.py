"""``pack``: a source's delta against the base, compressed module by module into a SkillPack.

Streams: each ``-j`` worker holds one tensor of the base and one of the source at a time, and
parts are written in name order whatever order the workers finish in.
"""

from __future__ import annotations

from collections.abc import Iterator
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


class PackStep:
    name: ClassVar[str] = "pack"
    # 2: lowrank encodes small rank budgets with a randomized SVD
    # 3: GPTQ rounds to its grid by division, as RTN does (codes differ at exact ties)
    # 4: a lossless (all-exact) pack of a source is a reference pack (no model-sized copy)
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
        import torch

        from graftbuild.compress.gptq import Calibration
        from graftbuild.compress.roles import classify
        from graftbuild.skillpack.writer import PackWriter, encode_with, parse, plan_layout
        from graftbuild.weights.memory import empty_like, release_freed_tensors
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
        header = {"base": ctx.input_hashes["base"]}
        if reference == "parent":
            header["parent"] = ctx.input_hashes["parent"]
        with (
            ModelWeights(ctx.inputs[reference]) as base,
            ModelWeights(ctx.inputs["source"]) as src,
        ):
            check_same_layout(base, src)
            note_dtype_differences(base, src, ctx)
            names = base.names()
            for name in names:
                if base.infos[name].dtype not in _DTYPE_NAMES:
                    raise UserError(
                        f"{base.folder}: tensor {name!r} has non-float dtype "
                        f"{base.infos[name].dtype}"
                    )
            # each tensor's role and codec, decided (and its spec validated) once
            roles = {n: classify(n, len(base.infos[n].shape), profile["roles"]) for n in names}
            specs = {name: profile[roles[name]] for name in names}
            if profile.get("budget") is not None:
                specs = allocate_budget(ctx, base, src, specs, float(profile["budget"]), hessians)
                header["budget"] = profile["budget"]
            parsed = {name: parse(spec) for name, spec in specs.items()}
            if REFERENCE_LOSSLESS and reference == "base" and lossless(parsed):
                write_reference(ctx, base, src, roles, header)
                return

            def encode(name: str) -> tuple:
                """One tensor's delta, encoded (runs on a -j worker; reads only its tensor)."""
                # both read through copy-on-write maps (no copy of the stored bytes), the delta
                # into a fresh buffer
                b = placement.put(base.map(name), torch.float32)
                x = placement.put(src.map(name), torch.float32)
                delta = torch.sub(x, b, out=empty_like(x))
                del b, x
                if not all_finite(delta):
                    raise UserError(f"{src.folder}: tensor {name!r}: NaN or Inf in the delta")
                codec, params = parsed[name]
                calibration = None
                h = hessians.get(name)
                if h is not None and h.ndim == 2 and codec.uses_calibration:
                    calibration = Calibration(h, cal["damp"], cal["act_order"])
                encoded = encode_with(codec, params, delta, calibration)
                return name, codec.name, params, tuple(delta.shape), encoded

            # When every tensor's entry is known before encoding (exact codec), the pack's header
            # is written first and each tensor goes straight to its place, in the file's order.
            layout: dict[str, Any] | None = {}
            for name in names:
                info = base.infos[name]
                planned = plan_layout(
                    parsed[name], roles[name], info.shape, _DTYPE_NAMES[info.dtype]
                )
                if planned is None:
                    layout = None
                    break
                layout[name] = planned  # type: ignore[index]
            with (
                PackWriter(ctx.out / PACK_FILE, header, layout) as writer,
                ctx.progress.task(f"pack {ctx.node_id}", len(names)) as advance,
            ):
                order = writer.order if writer.order is not None else names
                sizes = {n: base.infos[n].nbytes for n in names}
                work = ordered_map(
                    encode, order, ctx.settings.jobs, sizes.__getitem__, max(sizes.values())
                )
                for name, codec, params, shape, encoded in work:
                    dtype = _DTYPE_NAMES[base.infos[name].dtype]
                    writer.add(name, roles[name], codec, params, shape, dtype, encoded)
                    del encoded  # not alive while the next one is computed
                    advance(1)


REFERENCE_LOSSLESS = True
"""Lossless packs of a source (against the base) are written as reference packs. False: as
stored exact packs, as before version 4 (tests compare the two; the result is the same bytes)."""


def lossless(parsed: dict[str, tuple[Any, Any]]) -> bool:
    """Every tensor's codec is ``exact``: the delta is source - base, nothing lost."""
    return bool(parsed) and all(codec.name == "exact" for codec, _ in parsed.values())


def write_reference(
    ctx: StepContext, base: Any, src: Any, roles: dict[str, str], header: dict[str, Any]
) -> None:
    """A reference pack: the base's hash, the source's weight files by content hash, and each
    tensor's entry, with no payload; the fuse computes each delta from base and source. Its
    bytes change exactly when the source's weight files do (a new README leaves them: early
    cutoff), so a fuse keyed by them is keyed by the source's weights."""
    from graftbuild.cache.hashing import combine, hash_known
    from graftbuild.skillpack.writer import PackWriter, reference_layout

    folder = Path(src.folder)
    # hashed by the engine already in this process (the stat cache's test), else read here
    files = {p.relative_to(folder).as_posix(): hash_known(p) for p in src.files}
    header = header | {"reference": {"source": combine(files), "files": files}}
    layout = {
        n: reference_layout(roles[n], tuple(base.infos[n].shape), _DTYPE_NAMES[base.infos[n].dtype])
        for n in base.names()
    }
    with ctx.progress.task(f"pack {ctx.node_id}", 1) as advance:
        with PackWriter(ctx.out / PACK_FILE, header, layout):
            pass
        advance(1)


def iter_deltas(base: Any, src: Any) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(name, original dtype name, float32 delta) of every tensor, one at a time."""
    import torch

    from graftbuild.weights.tensors import all_finite

    for name in base.names():
        info = base.infos[name]
        if info.dtype not in _DTYPE_NAMES:
            raise UserError(f"{base.folder}: tensor {name!r} has non-float dtype {info.dtype}")
        b = base.get(name)
        delta = src.get(name).to(torch.float32) - b.to(torch.float32)
        del b
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
) -> dict[str, dict]:
    """Per-tensor specs fitting ``budget`` × the fp16 delta (a first pass over the deltas);
    errors are weighted by the calibration ``statistics`` where there are some."""
    from graftbuild.compress.budget import allocate, fp16_delta_nbytes, rate_profile

    profiles = []
    with ctx.progress.task(f"budget {ctx.node_id}", len(specs)) as advance:
        for name, _dtype, delta in iter_deltas(base, src):
            profiles.append(
                rate_profile(name, ctx.placement.put(delta), specs[name], statistics.get(name))
            )
            advance(1)
    target = int(budget * fp16_delta_nbytes([p.shape for p in profiles]))
    return allocate(profiles, target)


def check_same_layout(base: object, src: object) -> None:
    """A source must have exactly the base's tensor names and shapes (else: a transfer step)."""
    from graftbuild.weights.tensors import ModelWeights

    assert isinstance(base, ModelWeights) and isinstance(src, ModelWeights)
    only_base = sorted(set(base.infos) - set(src.infos))
    only_src = sorted(set(src.infos) - set(base.infos))
    shapes = sorted(
        f"{n} {list(base.infos[n].shape)} vs {list(src.infos[n].shape)}"
        for n in set(base.infos) & set(src.infos)
        if base.infos[n].shape != src.infos[n].shape
    )
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


def note_dtype_differences(base: object, src: object, ctx: StepContext) -> None:
    """A source may store its weights in another float dtype than the base (a bf16 fine-tune of
    an fp32 base): the delta is taken in float32 and the pack records the base's dtype, and the
    build says so. A non-float source tensor is refused."""
    from graftbuild.weights.tensors import ModelWeights

    assert isinstance(base, ModelWeights) and isinstance(src, ModelWeights)
    differ = sorted(n for n in base.infos if src.infos[n].dtype != base.infos[n].dtype)
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
    """``codec:NAME`` -> version of every codec a (normalised) profile's roles name."""
    from graftbuild.compress.codecs import get_codec
    from graftbuild.compress.roles import ROLES

    methods = {profile[role]["method"] for role in ROLES if role in profile}
    return {f"codec:{m}": get_codec(m).version for m in sorted(methods)}
