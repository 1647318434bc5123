"""``pack``: a source's delta against the base, compressed module by module into a SkillPack.

Streams: one tensor of the base and one of the source are in memory at a time.
"""

from __future__ import annotations

from typing import ClassVar

from graftbuild.errors import UserError
from graftbuild.steps.base import StepContext

PACK_FILE = "skillpack.safetensors"

_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


class PackStep:
    name: ClassVar[str] = "pack"
    version: ClassVar[int] = 2  # 2: lowrank encodes small rank budgets with a randomized SVD

    def run(self, ctx: StepContext) -> None:
        import torch

        from graftbuild.compress.roles import classify
        from graftbuild.memory import release_freed_tensors
        from graftbuild.parallel import ordered_map
        from graftbuild.skillpack import PackWriter, encode_tensor
        from graftbuild.tensors import ModelWeights

        release_freed_tensors()
        profile = ctx.config["profile"]
        device = ctx.settings.device
        # The header names the base (fusing checks it) but not the source folder's hash: a pack
        # is a function of the delta alone, so a source change that leaves the weights as they
        # were yields the same bytes and the fuse below is reused (early cutoff).
        header = {"base": ctx.input_hashes["base"]}
        with (
            ModelWeights(ctx.inputs["base"]) as base,
            ModelWeights(ctx.inputs["source"]) as src,
            PackWriter(ctx.out / PACK_FILE, header) as writer,
        ):
            check_same_layout(base, src)
            names = base.names()
            for name in names:
                if base.infos[name].dtype not in _DTYPE_NAMES:
                    raise UserError(
                        f"{base.folder}: tensor {name!r} has non-float dtype "
                        f"{base.infos[name].dtype}"
                    )

            def encode(name: str) -> tuple:
                """One tensor's delta, encoded (runs on a -j worker; reads only its tensor)."""
                b = base.get(name).to(device=device, dtype=torch.float32)
                delta = src.get(name).to(device=device, dtype=torch.float32) - b
                del b
                if not torch.isfinite(delta).all():
                    raise UserError(f"{src.folder}: tensor {name!r}: NaN or Inf in the delta")
                role = classify(name, delta.ndim, profile["roles"])
                codec, params, encoded = encode_tensor(delta, profile[role])
                return name, role, codec, params, tuple(delta.shape), encoded

            with ctx.progress.task(f"pack {ctx.node_id}", len(names)) as advance:
                sizes = {n: base.infos[n].nbytes for n in names}
                work = ordered_map(
                    encode, names, ctx.settings.jobs, sizes.__getitem__, max(sizes.values())
                )
                for name, role, codec, params, shape, encoded in work:
                    dtype = _DTYPE_NAMES[base.infos[name].dtype]
                    writer.add(name, role, codec, params, shape, dtype, encoded)
                    del encoded  # not alive while the next one is computed
                    advance(1)


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
