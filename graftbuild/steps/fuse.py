"""``fuse``: θ + strategy(Δ̂₁ … Δ̂ₙ), streamed tensor by tensor into a Hugging Face model folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from graftbuild.errors import BuildError
from graftbuild.recipe import ids
from graftbuild.skillpack.format import PACK_FILE
from graftbuild.steps.base import Node, StepContext

if TYPE_CHECKING:
    import torch

    from graftbuild.recipe import Recipe


class FuseStep:
    name: ClassVar[str] = "fuse"
    version: ClassVar[int] = 1
    uses_accelerator: ClassVar[bool] = True

    def nodes(self, recipe: Recipe, out: Path) -> list[Node]:
        """``fuse:NAME`` of every static fusion, and ``graft:NAME`` (base ⊕ NAME's chain, a plain
        sum) of every source another one names as its parent."""
        nodes = [graft_node(recipe, name) for name in recipe.parents()]
        for f in recipe.fuse:
            if f.strategy == "routed":
                continue  # a bundle: steps/bundle.py
            packs = {f"pack.{i}": ids.pack(p) for i, p in enumerate(f.packs)}
            nodes.append(
                Node(
                    ids.fuse(f.name),
                    "fuse",
                    config={
                        "packs": f.packs,
                        "weights": f.weight_list(),
                        "strategy": f.strategy,
                        "options": f.options,
                        "shard_size": f.shard_size,
                    },
                    deps={"base": ids.BASE} | packs,
                    labels={
                        "config.packs": "fusion order changed",
                        "config.weights": "fusion weights changed",
                        "config.strategy": "fusion strategy changed",
                        "config.options": "fusion options changed",
                        "config.shard_size": "shard size changed",
                        "dep:base": "base model changed",
                    }
                    | {f"dep:pack.{i}": f"pack '{p}' changed" for i, p in enumerate(f.packs)},
                    output=f.output or out / "fused" / f.name,
                    components=strategy_components(f.strategy),
                )
            )
        return nodes

    def run(self, ctx: StepContext) -> None:
        from contextlib import ExitStack

        from graftbuild.fusion import get_strategy
        from graftbuild.skillpack import PackReader
        from graftbuild.weights.memory import release_freed_tensors
        from graftbuild.weights.parallel import ordered_map
        from graftbuild.weights.tensors import (
            ModelWeights,
            copy_non_weight_files,
            write_model_weights,
        )

        release_freed_tensors()
        cfg = ctx.config
        placement = ctx.placement
        strategy = get_strategy(cfg["strategy"])
        params = strategy.Params.model_validate(cfg["options"])
        fold = getattr(strategy, "fold", None)  # optional streaming form (see fusion/base.py)
        fold_first = getattr(strategy, "fold_first", None) if fold is not None else None
        elementwise = fold is not None and getattr(strategy, "elementwise", False)
        roles = [f"pack.{i}" for i in range(len(cfg["packs"]))]
        with ExitStack() as stack:
            base = stack.enter_context(ModelWeights(ctx.inputs["base"]))
            # a reference pack reads its deltas from its source (forwarded by the engine as
            # ``pack.N.source``) and the base
            readers = [
                stack.enter_context(
                    PackReader(
                        ctx.inputs[r] / PACK_FILE, ctx.inputs["base"], ctx.inputs.get(f"{r}.source")
                    )
                )
                for r in roles
            ]
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
                out = placement.empty_like(b, torch.float32)
                if fold is not None:
                    # One delta in memory at a time; ``out`` is a fresh buffer, ours to overwrite.
                    weighted = zip(readers, cfg["weights"], strict=True)
                    packs = [(r, w) for r, w in weighted if name in r.entries]
                    weighted_all = list(packs)
                    if packs and fold_first is not None and b.dtype == torch.float32:
                        r, w = packs.pop(0)  # added straight from the base into ``out``
                        bp = placement.put(b)
                        if elementwise and r.is_reference:
                            # piece by piece, each piece's delta still in the CPU's cache when
                            # it is added: no tensor-sized delta, no second pass over memory
                            of, bf = out.view(-1), bp.reshape(-1)
                            chunks = r.delta_chunks(name, placement, bp, check_finite=False)
                            for lo, hi, d in chunks:
                                fold_first(bf[lo:hi], d, w, params, name, of[lo:hi])
                            acc = out
                        else:
                            delta = r.decode(name, placement)  # decoded on the device
                            acc = fold_first(bp, delta, w, params, name, out)
                            del delta
                        del bp
                    else:
                        acc = out.copy_(b)
                    for r, w in packs:
                        if elementwise and r.is_reference:  # no tensor-sized delta
                            flat = acc.view(-1)
                            chunks = r.delta_chunks(name, placement, b, check_finite=False)
                            for lo, hi, d in chunks:
                                fold(flat[lo:hi], d, w, params, name)
                        else:
                            delta = r.decode(name, placement, base_tensor=b)
                            acc = fold(acc, delta, w, params, name)
                            del delta
                    if elementwise and any(r.is_reference for r, _ in weighted_all):
                        check_reference_deltas(name, acc, weighted_all, b, placement)
                    return name, placement.host(acc, b.dtype)
                acc = out.copy_(b)
                deltas = [r.decode(name, placement) if name in r.entries else None for r in readers]
                out = strategy.combine(acc, deltas, cfg["weights"], params, name)
                return name, placement.host(out, b.dtype)

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


def check_reference_deltas(
    name: str, acc: torch.Tensor, packs: list, base: torch.Tensor, placement: object
) -> None:
    """Reference packs' deltas are folded unchecked: a NaN or infinity in one reaches the sum,
    so one pass over the result suffices; only when it is not finite are the deltas checked one
    by one, for the error that names the source (a sum that overflows from finite deltas is
    left as it was before)."""
    from graftbuild.weights.tensors import all_finite

    if all_finite(acc):
        return
    for r, _ in packs:
        if r.is_reference:
            for _ in r.delta_chunks(name, placement, base):
                pass  # raises on the first non-finite piece


def strategy_components(strategy: str) -> dict[str, int]:
    """``strategy:NAME`` -> its version: a fuse's key changes when its strategy's code does."""
    from graftbuild.fusion import get_strategy

    return {f"strategy:{strategy}": get_strategy(strategy).version}


def graft_node(recipe: Recipe, name: str) -> Node:
    """``graft:NAME``: base ⊕ every pack of NAME's chain (a plain sum), the model a child source
    was fine-tuned from and is packed against. Cache only; eval can name it."""
    chain = recipe.chain(name)
    return Node(
        ids.graft(name),
        "fuse",
        config={
            "packs": chain,
            "weights": [1.0] * len(chain),
            "strategy": "sum",
            "options": {},
            "shard_size": 2**62,
        },
        deps={"base": ids.BASE} | {f"pack.{i}": ids.pack(p) for i, p in enumerate(chain)},
        labels={"dep:base": "base model changed"}
        | {f"dep:pack.{i}": f"pack '{p}' changed" for i, p in enumerate(chain)},
        output=None,
        components=strategy_components("sum"),
    )
