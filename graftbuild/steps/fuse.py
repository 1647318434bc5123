"""``fuse``: θ + strategy(Δ̂₁ … Δ̂ₙ), streamed tensor by tensor into a Hugging Face model folder."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

from graftbuild.errors import BuildError
from graftbuild.steps.base import StepContext
from graftbuild.steps.pack import PACK_FILE

if TYPE_CHECKING:
    import torch


class FuseStep:
    name: ClassVar[str] = "fuse"
    version: ClassVar[int] = 1

    def run(self, ctx: StepContext) -> None:
        from contextlib import ExitStack

        from graftbuild.fusion import get_strategy
        from graftbuild.memory import empty_like, release_freed_tensors
        from graftbuild.parallel import ordered_map
        from graftbuild.skillpack import PackReader
        from graftbuild.tensors import ModelWeights, copy_non_weight_files, write_model_weights

        release_freed_tensors()
        cfg = ctx.config
        device = ctx.settings.device
        strategy = get_strategy(cfg["strategy"])
        params = strategy.Params.model_validate(cfg["options"])
        fold = getattr(strategy, "fold", None)  # optional streaming form (see fusion/base.py)
        fold_first = getattr(strategy, "fold_first", None) if fold is not None else None
        roles = [f"pack.{i}" for i in range(len(cfg["packs"]))]
        with ExitStack() as stack:
            base = stack.enter_context(ModelWeights(ctx.inputs["base"]))
            readers = [stack.enter_context(PackReader(ctx.inputs[r] / PACK_FILE)) for r in roles]
            for r, reader in zip(roles, readers, strict=True):
                if reader.header.get("base") != ctx.input_hashes["base"]:
                    raise BuildError(
                        f"{ctx.node_id}: {cfg['packs'][roles.index(r)]} was packed against "
                        "another base model"
                    )
                extra = sorted(set(reader.names()) - set(base.infos))
                if extra:
                    raise BuildError(f"{ctx.node_id}: pack tensors not in the base: {extra[:5]}")
            names = base.names()

            def fuse_one(name: str) -> tuple[str, torch.Tensor]:
                """One fused tensor (runs on a -j worker; reads only this tensor's inputs)."""
                import torch

                b = base.map(name)  # read, never written: no copy of the stored bytes
                out = empty_like(b, dtype=torch.float32, device=device)
                if fold is not None:
                    # One delta in memory at a time; ``out`` is a fresh buffer, ours to overwrite.
                    weighted = zip(readers, cfg["weights"], strict=True)
                    packs = [(r, w) for r, w in weighted if name in r.entries]
                    if packs and fold_first is not None and b.dtype == torch.float32:
                        r, w = packs.pop(0)  # added straight from the base into ``out``
                        delta = r.decode(name).to(device)
                        acc = fold_first(b.to(device), delta, w, params, name, out)
                        del delta
                    else:
                        acc = out.copy_(b)
                    for r, w in packs:
                        acc = fold(acc, r.decode(name).to(device), w, params, name)
                    return name, acc.to(device="cpu", dtype=b.dtype)
                acc = out.copy_(b)
                deltas = [r.decode(name).to(device) if name in r.entries else None for r in readers]
                out = strategy.combine(acc, deltas, cfg["weights"], params, name)
                return name, out.to(device="cpu", dtype=b.dtype)

            def fused() -> Iterator[tuple[str, torch.Tensor]]:
                with ctx.progress.task(f"fuse {ctx.node_id}", len(names)) as advance:
                    sizes = {n: base.infos[n].nbytes for n in names}
                    work = ordered_map(
                        fuse_one, names, ctx.settings.jobs, sizes.__getitem__, max(sizes.values())
                    )
                    for item in work:
                        yield item
                        del item  # not alive while the next one is computed
                        advance(1)

            infos = [base.infos[n] for n in names]
            copy_non_weight_files(ctx.inputs["base"], ctx.out)
            write_model_weights(ctx.out, infos, fused(), cfg["shard_size"])
