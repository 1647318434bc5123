"""What a ``pack`` node reads its delta from: a full fine-tuned checkpoint (Δ = source − base,
added token rows apart) or a PEFT LoRA adapter folder (Δ = B·A·scale), behind one interface
(``open_source``); and the checks of a source's layout and dtypes against the base's."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graftbuild.errors import UserError
from graftbuild.steps.base import StepContext

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
# Float buffers older transformers saved and newer ones omit (GPT-2's and GPT-NeoX's causal
# masks, rotary inverse frequencies): when the source lacks one, the base's is carried.
FLOAT_BUFFER = re.compile(r"(^|\.)((attn|attention)\.(bias|masked_bias)|rotary_emb\.inv_freq)$")


class ModelSource:
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

    def __enter__(self) -> ModelSource:
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


class AdapterSource:
    """A PEFT LoRA adapter folder: Δ = B·A·scale, unmerged (weights/adapter.py)."""

    def __init__(self, folder: Path, base: Any, ctx: StepContext) -> None:
        from graftbuild.weights.adapter import AdapterDeltas

        self.folder = Path(folder)
        self.base = base
        self.adapter = AdapterDeltas(self.folder, base)
        self._touched = self.adapter.touched()
        ctx.progress.log(f"note: {ctx.node_id}: source is a {self.adapter.describe()}")

    def __enter__(self) -> AdapterSource:
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


def open_source(folder: Path, base: Any, ctx: StepContext) -> ModelSource | AdapterSource:
    """The source's deltas against ``base``: a model folder, or a PEFT LoRA adapter folder."""
    from graftbuild.weights.adapter import is_adapter

    if is_adapter(folder):
        return AdapterSource(folder, base, ctx)
    return ModelSource(folder, base, ctx)


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
        {n for n, i in base.infos.items() if i.dtype not in DTYPE_NAMES} | set(carried)
    )
    if buffers:
        ctx.progress.log(
            f"note: {ctx.node_id}: {len(buffers)} tensors are buffers, not weights "
            f"(e.g. {buffers[0]}): the fused model carries the base's, they are not packed"
        )


def check_same_layout(base: object, src: object) -> dict[str, int]:
    """A source must have the base's weights, names and shapes (else: a transfer step), except
    for buffers (non-float tensors, carried from the base) and rows added after the base's
    (new tokens' embedding and head rows). Returns tensor -> number of added rows."""
    from graftbuild.weights.tensors import ModelWeights

    assert isinstance(base, ModelWeights) and isinstance(src, ModelWeights)
    floats = {n for n, i in base.infos.items() if i.dtype in DTYPE_NAMES}
    src_floats = {n for n, i in src.infos.items() if i.dtype in DTYPE_NAMES}
    # float buffers (GPT-2's causal mask `attn.bias`, ...) that one side saved and the other not
    only_base = sorted(n for n in floats - set(src.infos) if not FLOAT_BUFFER.search(n))
    only_src = sorted(n for n in src_floats - set(base.infos) if not FLOAT_BUFFER.search(n))
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
        and base.infos[n].dtype in DTYPE_NAMES
        and src.infos[n].dtype != base.infos[n].dtype
    )
    if not differ:
        return
    bad = [n for n in differ if src.infos[n].dtype not in DTYPE_NAMES]
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
