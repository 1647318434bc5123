"""``pack``: a source's delta against the base, compressed module by module into a SkillPack.

Streams: each ``-j`` worker holds one tensor of the base and one of the source at a time, and
parts are written in name order whatever order the workers finish in.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from graftbuild.errors import UserError
from graftbuild.steps.base import StepContext

if TYPE_CHECKING:
    import torch

PACK_FILE = "skillpack.safetensors"

_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


class PackStep:
    name: ClassVar[str] = "pack"
    # 2: lowrank encodes small rank budgets with a randomized SVD
    # 3: GPTQ rounds to its grid by division, as RTN does (codes differ at exact ties)
    version: ClassVar[int] = 3

    def run(self, ctx: StepContext) -> None:
        import torch

        from graftbuild.compress.gptq import Calibration
        from graftbuild.compress.roles import classify
        from graftbuild.memory import empty_like, release_freed_tensors
        from graftbuild.parallel import ordered_map
        from graftbuild.skillpack import PackWriter, encode_tensor, plan_layout
        from graftbuild.tensors import ModelWeights, all_finite

        release_freed_tensors()
        profile = ctx.config["profile"]
        device = ctx.settings.device
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
                device,
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
            specs = {
                name: profile[classify(name, len(base.infos[name].shape), profile["roles"])]
                for name in names
            }
            if profile.get("budget") is not None:
                specs = allocate_budget(ctx, base, src, specs, float(profile["budget"]), hessians)
                header["budget"] = profile["budget"]

            def encode(name: str) -> tuple:
                """One tensor's delta, encoded (runs on a -j worker; reads only its tensor)."""
                # both read through copy-on-write maps (no copy of the stored bytes), the delta
                # into a fresh buffer
                b = base.map(name).to(device=device, dtype=torch.float32)
                x = src.map(name).to(device=device, dtype=torch.float32)
                delta = torch.sub(x, b, out=empty_like(x))
                del b, x
                if not all_finite(delta):
                    raise UserError(f"{src.folder}: tensor {name!r}: NaN or Inf in the delta")
                role = classify(name, delta.ndim, profile["roles"])
                calibration = None
                h = hessians.get(name)
                if h is not None and h.ndim == 2 and specs[name]["method"] == "mixed":
                    calibration = Calibration(h, cal["damp"], cal["act_order"])
                # finiteness was checked just above, naming the tensor
                codec, params, encoded = encode_tensor(
                    delta, specs[name], calibration, check_finite=False
                )
                return name, role, codec, params, tuple(delta.shape), encoded

            # When every tensor's entry is known before encoding (exact codec), the pack's header
            # is written first and each tensor goes straight to its place, in the file's order.
            layout: dict[str, Any] | None = {}
            for name in names:
                info = base.infos[name]
                planned = plan_layout(
                    specs[name],
                    classify(name, len(info.shape), profile["roles"]),
                    info.shape,
                    _DTYPE_NAMES[info.dtype],
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
                for name, role, codec, params, shape, encoded in work:
                    dtype = _DTYPE_NAMES[base.infos[name].dtype]
                    writer.add(name, role, codec, params, shape, dtype, encoded)
                    del encoded  # not alive while the next one is computed
                    advance(1)


def iter_deltas(base: Any, src: Any) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(name, original dtype name, float32 delta) of every tensor, one at a time."""
    import torch

    from graftbuild.tensors import all_finite

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
                rate_profile(name, delta.to(ctx.settings.device), specs[name], statistics.get(name))
            )
            advance(1)
    target = int(budget * fp16_delta_nbytes([p.shape for p in profiles]))
    return allocate(profiles, target)


def check_same_layout(base: object, src: object) -> None:
    """A source must have exactly the base's tensor names and shapes (else: a transfer step)."""
    from graftbuild.tensors import ModelWeights

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
    from graftbuild.tensors import ModelWeights

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
