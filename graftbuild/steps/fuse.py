"""``fuse``: θ + strategy(Δ̂₁ … Δ̂ₙ), streamed tensor by tensor into a Hugging Face model folder."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from graftbuild.errors import BuildError, UserError
from graftbuild.recipe import ids
from graftbuild.skillpack.format import PACK_FILE
from graftbuild.steps.base import Node, StepContext

if TYPE_CHECKING:
    import torch

    from graftbuild.recipe import Recipe
    from graftbuild.recipe.schema import FuseSpec
    from graftbuild.skillpack import PackReader
    from graftbuild.weights.tensors import Streamed, TensorInfo


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
            config, extra_deps = mergekit_config(recipe, f)
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
                    }
                    | config,
                    deps={"base": ids.BASE} | packs | extra_deps,
                    labels={
                        "config.packs": "fusion order changed",
                        "config.weights": "fusion weights changed",
                        "config.strategy": "fusion strategy changed",
                        "config.options": "fusion options changed",
                        "config.shard_size": "shard size changed",
                        "config.pack_options": "per-pack fusion options changed",
                        "config.tokenizer_source": "tokenizer source changed",
                        "dep:base": "base model changed",
                        "dep:tokenizer": "tokenizer source changed",
                    }
                    | {f"dep:pack.{i}": f"pack '{p}' changed" for i, p in enumerate(f.packs)}
                    | {"config.slices": "slices changed"},
                    output=f.output or out / "fused" / f.name,
                    components=strategy_components(f.strategy),
                )
            )
        return nodes

    def run(self, ctx: StepContext) -> None:
        from contextlib import ExitStack, nullcontext

        from graftbuild.fusion import get_strategy
        from graftbuild.skillpack import PackReader
        from graftbuild.weights.determinism import elementwise_threads
        from graftbuild.weights.memory import paused_gc, release_freed_tensors
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
        bind = getattr(strategy, "bind", None)  # mergekit-named strategies: per-pack settings
        if bind is not None:
            import json

            n = len(cfg["packs"])
            base_cfg = json.loads((ctx.inputs["base"] / "config.json").read_text())
            params = bind(params, cfg.get("pack_options") or [{}] * n, base_cfg, cfg["weights"])
        out_dtype = out_dtype_of(cfg["options"])  # mergekit's dtype / out_dtype
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

                def fold_pieces(
                    b: torch.Tensor, out: torch.Tensor, packs: list[tuple[int, PackReader, float]]
                ) -> torch.Tensor:
                    """``out`` = base ⊕ every reference pack's delta, piece by piece: each
                    piece of the base, of every source and of ``out`` is read or written once,
                    all the folds done while it is in the CPU's cache (per entry, the same ops
                    in the same order as pack by pack over the whole tensor: the same bytes).
                    Finiteness is checked on each finished piece; a non-finite one has the
                    deltas checked for the error naming the source (check_reference_deltas)."""
                    from graftbuild.weights.tensors import all_finite

                    bp = placement.put(b)
                    of, bf = out.view(-1), bp.reshape(-1)
                    pieces = [
                        r.delta_chunks(name, placement, bp, check_finite=False) for _, r, _ in packs
                    ]
                    weights = [w for _, _, w in packs]
                    from_base = fold_first is not None and b.dtype == torch.float32
                    finite = True
                    for chunk in zip(*pieces, strict=True):
                        lo, hi, d = chunk[0]
                        o = of[lo:hi]
                        if from_base:  # added straight from the base into ``out``
                            fold_first(bf[lo:hi], d, weights[0], params, name, o)
                        else:
                            fold(o.copy_(bf[lo:hi]), d, weights[0], params, name)
                        for (_, _, d), w in zip(chunk[1:], weights[1:], strict=True):
                            fold(o, d, w, params, name)
                        finite = finite and all_finite(o)
                    if not finite:
                        check_reference_deltas(
                            name, out, [(r, w) for _, r, w in packs], b, placement
                        )
                    return out

                out = placement.empty_like(b, torch.float32)
                if fold is not None:
                    # One delta in memory at a time; ``out`` is a fresh buffer, ours to overwrite.
                    weighted = zip(range(len(readers)), readers, cfg["weights"], strict=True)
                    packs = [(i, r, w) for i, r, w in weighted if name in r.entries]
                    weighted_all = [(r, w) for _, r, w in packs]
                    # a reference pack's delta folded piece by piece (not when another pack
                    # widens this tensor with added token rows)
                    chunked = elementwise and name not in rows
                    if chunked and packs and all(r.is_reference for _, r, _ in packs):
                        return name, placement.host(fold_pieces(b, out, packs), b.dtype)
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
                return name, placement.host(out, out_dtype or b.dtype)

            infos = [base.infos[n] for n in names]
            sliced = cfg.get("slices")
            if sliced is not None:  # mergekit's slices: layers taken from ranges of the inputs
                import dataclasses

                layer_plan, n_layers = slice_plan(ctx, base, sliced, cfg["packs"])
                fuse_one = sliced_fuse_one(
                    base, readers, layer_plan, strategy, params, cfg, placement, out_dtype
                )
                infos = [
                    dataclasses.replace(base.infos[p.base_name], name=n)
                    for n, p in layer_plan.items()
                ]
                names = list(layer_plan)

            # A sum of reference packs (the lossless pipeline) on the CPU: streamed piece by
            # piece into reused buffers, nothing tensor-sized in memory (steps/fuse_stream.py).
            streamed = elementwise and sliced is None and not rows and out_dtype is None
            streamed = streamed and not placement.on_accelerator and bool(readers)
            streamed = streamed and all(r.is_reference for r in readers)

            def fused() -> Iterator[tuple[str, torch.Tensor | Streamed]]:
                with ctx.progress.task(f"fuse {ctx.node_id}", len(names), unit="tensor") as advance:
                    if streamed:
                        from graftbuild.steps.fuse_stream import streamed_fuse

                        yield from streamed_fuse(
                            names,
                            base,
                            readers,
                            cfg["weights"],
                            strategy,
                            params,
                            ctx.settings.jobs,
                            lambda name: fuse_one(name)[1],
                            advance,
                        )
                        return
                    sizes = {i.name: i.nbytes for i in infos}
                    ctx.placement.warm_up()  # before -j threads make their first linalg calls
                    work = ordered_map(
                        fuse_one, names, ctx.settings.jobs, sizes.__getitem__, max(sizes.values())
                    )
                    for item in work:
                        yield item
                        del item  # not alive while the next one is computed
                        advance(1)

            infos = [
                replace(i, shape=(rows[i.name], *i.shape[1:])) if i.name in rows else i
                for i in infos
            ]
            if out_dtype is not None:
                infos = [retyped(i, out_dtype) for i in infos]
            copy_non_weight_files(ctx.inputs["base"], ctx.out)
            if vocab:
                from graftbuild.weights.vocab import set_vocab_size, write_fused_tokenizer

                write_fused_tokenizer(ctx.inputs["base"], ctx.out, vocab["tokens"])
                if (ctx.out / "config.json").is_file():
                    set_vocab_size(ctx.out / "config.json", vocab["size"])
            if "tokenizer" in ctx.inputs:  # tokenizer_source: that source's tokenizer files
                copy_tokenizer_files(ctx.inputs["tokenizer"], ctx.out)
            if out_dtype is not None:
                set_config_dtype(ctx.out, out_dtype)
            if sliced is not None:
                set_config_layers(ctx.out, n_layers, layer_types(ctx, sliced))
            # A sum of reference packs is elementwise from end to end (subtract, weighted add,
            # convert): its bytes do not depend on intra-op threads, so it may use them.
            threaded = elementwise and sliced is None and not rows
            threaded = threaded and all(r.is_reference for r in readers)
            # The streamed fuse makes a few short-lived, acyclic tensor views per piece: the
            # cyclic collector's passes over torch's objects are pure cost there.
            with (
                elementwise_threads() if threaded else nullcontext(),
                paused_gc() if streamed else nullcontext(),
            ):
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


# --- mergekit parity (issue 18) ----------------------------------------------------------------


def mergekit_config(recipe: Recipe, f: FuseSpec) -> tuple[dict[str, Any], dict[str, str]]:
    """A fuse's per-pack options and tokenizer source, in its config only when used (a fuse that
    uses neither keeps the key it had before them)."""
    config: dict[str, Any] = {}
    deps: dict[str, str] = {}
    if f.pack_options:
        config["pack_options"] = [f.pack_options.get(p, {}) for p in f.packs]
    if f.slices is not None:
        config["slices"] = [s.model_dump(mode="json") for s in f.slices]
    if f.tokenizer_source != "base":
        src = recipe.sources[f.tokenizer_source]
        if src.path is None:
            raise UserError(
                f"fuse {f.name}: tokenizer_source {f.tokenizer_source!r} must be a `path` source"
            )
        config["tokenizer_source"] = f.tokenizer_source
        deps["tokenizer"] = recipe.source_model(f.tokenizer_source)
    return config, deps


def out_dtype_of(options: dict[str, Any]) -> torch.dtype | None:
    """mergekit's ``out_dtype``, else its ``dtype``, else None (the base's dtypes)."""
    import torch

    name = options.get("out_dtype") or options.get("dtype")
    return None if name is None else getattr(torch, name)


def retyped(info: TensorInfo, dtype: torch.dtype) -> TensorInfo:
    """``info`` for the same tensor stored as ``dtype`` (floating tensors only)."""
    import dataclasses

    from graftbuild.weights.tensors import torch_dtype_to_st

    if not info.dtype.startswith(("F", "BF")):
        return info
    return dataclasses.replace(info, dtype=torch_dtype_to_st(dtype))


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    import shutil

    for name in TOKENIZER_FILES:
        if (dst / name).exists():
            (dst / name).unlink()
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def set_config_dtype(folder: Path, dtype: torch.dtype) -> None:
    import json

    path = folder / "config.json"
    if path.is_file():
        cfg = json.loads(path.read_text())
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def slice_plan(
    ctx: StepContext, base: Any, slices: list[dict[str, Any]], packs: list[str]
) -> tuple[dict[str, Any], int]:
    import json

    from graftbuild.fusion import get_strategy
    from graftbuild.fusion.schedule import num_layers_of
    from graftbuild.steps import slices as sl

    n = num_layers_of(json.loads((ctx.inputs["base"] / "config.json").read_text()))
    try:
        sl.check(slices, packs, n)
    except ValueError as e:
        raise UserError(f"{ctx.node_id}: {e}") from None
    strategy = get_strategy(ctx.config["strategy"])
    lo, hi = getattr(strategy, "min_packs", 1), getattr(strategy, "max_packs", None)
    for i, s in enumerate(slices):
        k = sum(src["model"] != "base" for src in s["sources"])
        if k and (k < lo or (hi is not None and k > hi)):
            raise UserError(
                f"{ctx.node_id}: slices[{i}]: {strategy.name!r} takes {lo}"
                f"{'' if hi == lo else '+' if hi is None else f'-{hi}'} pack(s), got {k}"
            )
    return sl.plan(base.names(), slices, packs)


def sliced_fuse_one(
    base: Any,
    readers: list[Any],
    layer_plan: dict[str, Any],
    strategy: Any,
    params: Any,
    cfg: dict[str, Any],
    placement: Any,
    out_dtype: torch.dtype | None,
) -> Any:
    """The per-tensor function of a sliced fuse: θ is the slice's base source (or the base's
    tensor at the first source's layer), each pack source enters as θᵢ − θ."""
    import dataclasses

    from graftbuild.fusion.schedule import Bound

    def fuse_one(name: str) -> tuple[str, torch.Tensor]:
        import torch

        p = layer_plan[name]
        b_raw = base.map(p.base_name)
        b = placement.put(b_raw, torch.float32).clone()
        idx: list[int] = []
        deltas: list[torch.Tensor | None] = []
        for who, src in p.inputs:
            if who == "base":
                continue
            r = readers[who]
            d = r.decode(src, placement) if src in r.entries else None
            if src != p.base_name:  # θᵢ − θ from another layer
                theta = placement.put(base.map(src), torch.float32)
                d = theta - b if d is None else (theta + d) - b
            idx.append(who)
            deltas.append(d)
        if not idx:  # only the base: its layer as it is
            return name, placement.host(b, out_dtype or b_raw.dtype)
        weights = [cfg["weights"][i] for i in idx]
        if isinstance(params, Bound):
            own = dataclasses.replace(
                params, packs=[params.packs[i] for i in idx], weights=weights, t={name: p.t}
            )
        else:
            own = params
        out = strategy.combine(b, deltas, weights, own, name)
        return name, placement.host(out, out_dtype or b_raw.dtype)

    return fuse_one


def layer_types(ctx: StepContext, slices: list[dict[str, Any]]) -> list[Any] | None:
    """The base config's per-layer list (``layer_types``), rearranged like the layers."""
    import json

    cfg = json.loads((ctx.inputs["base"] / "config.json").read_text())
    types = cfg.get("layer_types")
    if not isinstance(types, list):
        return None
    out = []
    for s in slices:
        a, b = s["sources"][0]["layer_range"]
        out += types[a:b]
    return out


def set_config_layers(folder: Path, n: int, types: list[Any] | None) -> None:
    import json

    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if isinstance(cfg.get(key), int):
            cfg[key] = n
    if types is not None:
        cfg["layer_types"] = types
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
