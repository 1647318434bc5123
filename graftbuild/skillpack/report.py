"""What a SkillPack stores, tensor by tensor, per layer and per role (``graftbuild inspect``).

The relative error ``‖Δ − Δ̂‖ / ‖Δ‖`` is reported when the delta's models are given (base and
source folders). Codecs describe their own entries (``codec.describe``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from graftbuild.errors import UserError

_LAYER = re.compile(r"(^|\.)(layers|layer|h|blocks|block)\.(\d+)\.")


def layer_of(name: str) -> str:
    match = _LAYER.search(name)
    return match.group(3) if match else "-"


def describe(entry: dict[str, Any]) -> dict[str, Any]:
    """Codec, rank, bands and keep fraction of one pack entry, as its codec describes it."""
    from graftbuild.compress.codecs import get_codec
    from graftbuild.compress.codecs.base import describe_entry

    return describe_entry(get_codec(entry["codec"]), entry)


def pack_report(pack: Path, base: Path | None, source: Path | None) -> dict[str, Any]:
    """Everything ``inspect`` shows, as JSON-able data."""
    from graftbuild.skillpack.reader import PackReader

    weights: tuple[Any, Any] | None = None
    with PackReader(pack, base, source) as reader:  # a reference pack decodes from them
        if base is not None and source is not None:
            from graftbuild.weights.adapter import AdapterDeltas, is_adapter
            from graftbuild.weights.tensors import ModelWeights

            bw = ModelWeights(base)
            try:  # a LoRA adapter source: its deltas, read from its factors
                sw = AdapterDeltas(source, bw) if is_adapter(source) else ModelWeights(source)
            except BaseException:
                bw.close()
                raise
            weights = (bw, sw)
        try:
            tensors = []
            for name in reader.names():
                entry = reader.entries[name]
                row = {
                    "name": name,
                    "layer": layer_of(name),
                    "role": entry["role"],
                    "shape": entry["shape"],
                    "bytes": reader.entry_nbytes(name),
                    **describe(entry),
                    "rel_error": None,
                    "sq_error": None,
                    "sq_norm": None,
                }
                if weights is not None:
                    b, s = weights
                    delta = _delta(pack, name, b, s)
                    err = float((reader.decode(name) - delta).pow(2).sum())
                    sq = float(delta.pow(2).sum())
                    row |= {"sq_error": err, "sq_norm": sq, "rel_error": _rel(err, sq)}
                tensors.append(row)
        finally:
            if weights is not None:
                weights[0].close()
                getattr(weights[1], "close", lambda: None)()
        total = sum(t["bytes"] for t in tensors)
        fp16 = sum(2 * math.prod(t["shape"]) for t in tensors)
        report = {
            "pack": str(pack),
            "format_version": reader.format_version,
            "header": reader.header,
            "file_bytes": pack.stat().st_size,
            "payload_bytes": total,
            "header_bytes": pack.stat().st_size - total,
            "fp16_delta_bytes": fp16,
            "size_vs_fp16": total / fp16 if fp16 else 0.0,
            "tensors": tensors,
        }
    budget = report["header"].get("budget")
    if budget and fp16:  # a budget bounds the whole file, header included
        report["file_vs_budget"] = report["file_bytes"] / (budget * fp16)
    for t in tensors:
        t["share"] = t["bytes"] / total if total else 0.0
    report["by_role"] = _group(tensors, "role", total)
    report["by_layer"] = _group(tensors, "layer", total)
    if weights is not None:
        err = sum(t["sq_error"] for t in tensors)
        report["rel_error"] = _rel(err, sum(t["sq_norm"] for t in tensors))
    return report


def _delta(pack: Path, name: str, b: Any, s: Any) -> Any:
    """The true delta of one tensor: source − base (a new token's row against nothing), or a
    LoRA adapter's B·A·scale."""
    import torch

    from graftbuild.weights.adapter import AdapterDeltas

    if name not in b:
        raise UserError(f"{pack}: tensor {name!r} is not in the base")
    if isinstance(s, AdapterDeltas):
        return s.delta(name, b)
    if name not in s:
        raise UserError(f"{pack}: tensor {name!r} is not in the source")
    x, y = s.get(name).float(), b.get(name).float()
    if x.shape[0] > y.shape[0]:
        return torch.cat([x[: y.shape[0]] - y, x[y.shape[0] :]])
    return x - y


def _rel(err: float, sq: float) -> float:
    return math.sqrt(err / sq) if sq > 0 else (0.0 if err == 0 else math.inf)


def _group(tensors: list[dict[str, Any]], key: str, total: int) -> list[dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for t in tensors:
        groups.setdefault(t[key], []).append(t)
    out = []
    for name, rows in groups.items():
        nbytes = sum(t["bytes"] for t in rows)
        row = {
            key: name,
            "tensors": len(rows),
            "codecs": sorted({t["codec"] for t in rows}),
            "bytes": nbytes,
            "share": nbytes / total if total else 0.0,
            "rel_error": None,
        }
        if all(t["sq_error"] is not None for t in rows):
            row["rel_error"] = _rel(
                sum(t["sq_error"] for t in rows), sum(t["sq_norm"] for t in rows)
            )
        out.append(row)
    order = (
        (lambda r: (r[key] == "-", int(r[key]) if r[key] != "-" else 0))
        if key == "layer"
        else (lambda r: r[key])
    )
    return sorted(out, key=order)


def improvement_kept(
    pack: Path, base: Path, source: Path, data: Path, samples: int = 32, seq_len: int = 64
) -> dict[str, Any]:
    """The graft's share of the fine-tune's improvement in language-modelling loss on held-out
    ``data``: ``(L_base − L_graft) / (L_base − L_source)`` (causal LMs), with the three losses."""
    from graftbuild.compress.calibration import calibration_loss
    from graftbuild.skillpack.reader import PackReader
    from graftbuild.weights.tensors import ModelWeights

    def loss(deltas: Any) -> float:
        return calibration_loss(base, data, samples, seq_len, deltas)

    with ModelWeights(base) as b:
        rows = {n: i.shape[0] for n, i in b.infos.items() if i.shape}

    def source_deltas() -> Any:
        with ModelWeights(base) as b, ModelWeights(source) as s:
            for name in b.names():
                x = b.get(name)
                if not x.is_floating_point() or name not in s.infos:
                    continue  # a buffer: the same in both
                # rows of added tokens have no base rows to move: the base's vocabulary only
                yield name, s.get(name)[: rows.get(name)].float() - x.float()

    def graft_deltas() -> Any:
        # a reference pack (lossless) reads its deltas from the base and source folders
        with PackReader(pack, base, source) as reader:
            for name in reader.names():
                yield name, reader.decode(name)[: rows.get(name)]

    loss_base, loss_source, loss_graft = loss([]), loss(source_deltas()), loss(graft_deltas())
    gain = loss_base - loss_source
    return {
        "data": str(data),
        "loss_base": loss_base,
        "loss_source": loss_source,
        "loss_graft": loss_graft,
        "keep": (loss_base - loss_graft) / gain if gain else float("nan"),
    }
