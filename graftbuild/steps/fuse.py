"""``fuse``: θ + strategy(Δ̂₁ … Δ̂ₙ), streamed tensor by tensor into a Hugging Face model folder."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from graftbuild.errors import BuildError
from graftbuild.recipe import ids
from graftbuild.skillpack.format import PACK_FILE
from graftbuild.steps.base import Node, StepContext

if TYPE_CHECKING:
    import torch

    from graftbuild.recipe import Recipe
    from graftbuild.skillpack import PackReader


class FuseStep:
    name: ClassVar[str] = "fuse"
    # 2: buffers carried as they are; added tokens widen the vocabulary; non-weight subfolders
    version: ClassVar[int] = 2
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
            vocab = fused_vocabulary(ctx, base, readers, cfg["packs"])
            rows = vocab["rows"] if vocab else {}  # tensor -> fused row count

            def widen(r: PackReader, name: str, delta: torch.Tensor, i: int) -> torch.Tensor:
                """A pack's delta over the fused rows: its added token rows moved to their
                fused ids, zeros where it has none."""
                n = rows[name]
                if delta.shape[0] == n:
                    return delta
                base_rows = base.infos[name].shape[0]
                out = delta.new_zeros((n, *delta.shape[1:]))
                out[:base_rows] = delta[:base_rows]
                for src_row, fused_row in vocab["maps"][i].items():  # type: ignore[index]
                    if base_rows <= src_row < delta.shape[0]:
                        out[fused_row] = delta[src_row]
                return out

            def fuse_one(name: str) -> tuple[str, torch.Tensor]:
                """One fused tensor (runs on a -j worker; reads only this tensor's inputs)."""
                import torch

                b = base.map(name)  # read, never written: no copy of the stored bytes
                if not b.is_floating_point():
                    return name, b.clone()  # a buffer (position_ids): the base's, as it is

                b0 = b  # the base's own rows: a reference pack's deltas are against them
                if name in rows:
                    b = torch.cat([b, b.new_zeros((rows[name] - b.shape[0], *b.shape[1:]))])

                def decode(r: PackReader, i: int) -> torch.Tensor:
                    d = r.decode(name, placement, base_tensor=b0)  # decoded on the device
                    return widen(r, name, d, i) if name in rows else d

                out = placement.empty_like(b, torch.float32)
                if fold is not None:
                    # One delta in memory at a time; ``out`` is a fresh buffer, ours to overwrite.
                    weighted = zip(range(len(readers)), readers, cfg["weights"], strict=True)
                    packs = [(i, r, w) for i, r, w in weighted if name in r.entries]
                    weighted_all = [(r, w) for _, r, w in packs]
                    # a reference pack's delta folded piece by piece (not when another pack
                    # widens this tensor with added token rows)
                    chunked = elementwise and name not in rows
                    if packs and fold_first is not None and b.dtype == torch.float32:
                        i, r, w = packs.pop(0)  # added straight from the base into ``out``
                        bp = placement.put(b)
                        if chunked and r.is_reference:
                            # piece by piece, each piece's delta still in the CPU's cache when
                            # it is added: no tensor-sized delta, no second pass over memory
                            of, bf = out.view(-1), bp.reshape(-1)
                            chunks = r.delta_chunks(name, placement, bp, check_finite=False)
                            for lo, hi, d in chunks:
                                fold_first(bf[lo:hi], d, w, params, name, of[lo:hi])
                            acc = out
                        else:
                            delta = decode(r, i)  # decoded on the device
                            acc = fold_first(bp, delta, w, params, name, out)
                            del delta
                        del bp
                    else:
                        acc = out.copy_(b)
                    for i, r, w in packs:
                        if chunked and r.is_reference:  # no tensor-sized delta
                            flat = acc.view(-1)
                            chunks = r.delta_chunks(name, placement, b, check_finite=False)
                            for lo, hi, d in chunks:
                                fold(flat[lo:hi], d, w, params, name)
                        else:
                            delta = decode(r, i)
                            acc = fold(acc, delta, w, params, name)
                            del delta
                    if chunked and any(r.is_reference for r, _ in weighted_all):
                        check_reference_deltas(name, acc, weighted_all, b, placement)
                    return name, placement.host(acc, b.dtype)
                acc = out.copy_(b)
                deltas = [
                    decode(r, i) if name in r.entries else None for i, r in enumerate(readers)
                ]
                out = strategy.combine(acc, deltas, cfg["weights"], params, name)
                return name, placement.host(out, b.dtype)

            def fused() -> Iterator[tuple[str, torch.Tensor]]:
                with ctx.progress.task(f"fuse {ctx.node_id}", len(names), unit="tensor") as advance:
                    sizes = {n: base.infos[n].nbytes for n in names}
                    work = ordered_map(
                        fuse_one, names, ctx.settings.jobs, sizes.__getitem__, max(sizes.values())
                    )
                    for item in work:
                        yield item
                        del item  # not alive while the next one is computed
                        advance(1)

            infos = [
                replace(i, shape=(rows[i.name], *i.shape[1:])) if i.name in rows else i
                for i in (base.infos[n] for n in names)
            ]
            copy_non_weight_files(ctx.inputs["base"], ctx.out)
            if vocab:
                from graftbuild.weights.vocab import set_vocab_size, write_fused_tokenizer

                write_fused_tokenizer(ctx.inputs["base"], ctx.out, vocab["tokens"])
                if (ctx.out / "config.json").is_file():
                    set_vocab_size(ctx.out / "config.json", vocab["size"])
            write_model_weights(ctx.out, infos, fused(), cfg["shard_size"])


def fused_vocabulary(
    ctx: StepContext, base: Any, readers: list[Any], packs: list[str]
) -> dict[str, Any] | None:
    """The fused vocabulary when some pack adds tokens: the fused tokens, per pack its source
    id -> fused id, each widened tensor's fused row count and the vocabulary size; else None."""
    from graftbuild.weights.vocab import fuse_vocabularies

    vocabs = [r.header.get("vocab") for r in readers]
    if not any(vocabs):
        return None
    from transformers import AutoTokenizer

    base_rows = next(int(v["base_rows"]) for v in vocabs if v)
    tok = AutoTokenizer.from_pretrained(
        str(ctx.inputs["base"]), local_files_only=True, trust_remote_code=False
    )
    tokens, maps = fuse_vocabularies(
        len(tok),
        base_rows,
        [(p, (v or {}).get("tokens", [])) for p, v in zip(packs, vocabs, strict=True)],
    )
    size = max([base_rows] + [t["id"] + 1 for t in tokens])
    widened = {
        name: size
        for r in readers
        for name, e in r.entries.items()
        if e.get("added_rows") and name in base.infos
    }
    ctx.progress.log(
        f"note: {ctx.node_id}: the fused vocabulary adds {len(tokens)} tokens to the base's "
        f"({', '.join(repr(t['content']) for t in tokens[:5])}{', ...' if len(tokens) > 5 else ''})"
    )
    return {"tokens": tokens, "maps": maps, "rows": widened, "size": size}


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
