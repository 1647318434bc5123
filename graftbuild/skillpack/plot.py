"""A SkillPack's report (report.py) drawn: per layer and role, the bytes stored, the fraction of
each tensor kept (rank over its full rank, or the prune codec's keep fraction; exact = 1) and
the energy of the delta kept, 1 − ‖Δ − Δ̂‖² / ‖Δ‖² (when the base and source are known).

matplotlib is an optional extra (``pip install 'graftbuild[plot]'``), imported only here; the
figure is drawn off screen (Agg) at a fixed size, ``SIZE`` pixels.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from graftbuild.errors import UserError

SIZE = (1200, 900)
"""Width and height of the PNG in pixels."""
_DPI = 100


def kept_fraction(t: dict[str, Any]) -> float | None:
    """How much of a tensor the codec keeps: rank / min(shape), the keep fraction, or 1 (exact)."""
    if t.get("keep") is not None:
        return float(t["keep"])
    if t.get("rank") is not None and len(t["shape"]) == 2:
        return min(1.0, t["rank"] / max(1, min(t["shape"])))
    if t.get("codec") == "exact":
        return 1.0
    return None


def _layers(tensors: list[dict[str, Any]]) -> list[str]:
    """Numbered layers in order, then the tensors outside any layer ("-": embeddings, head)."""
    found = {t["layer"] for t in tensors}
    numbered = sorted((x for x in found if x.isdigit()), key=int)
    return numbered + sorted(found - set(numbered))


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'graftbuild[plot]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_report(report: dict[str, Any], title: str | None = None) -> bytes:
    """The PNG (``SIZE`` pixels) of a pack report."""
    plt = _matplotlib()
    tensors = report["tensors"]
    layers = _layers(tensors)
    roles = sorted({t["role"] for t in tensors})
    cell: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for t in tensors:
        cell.setdefault((t["layer"], t["role"]), []).append(t)

    def per(fn: Any) -> dict[str, list[float]]:
        return {
            r: [(fn(cell[(layer, r)]) if (layer, r) in cell else math.nan) for layer in layers]
            for r in roles
        }

    def nbytes(rows: list[dict[str, Any]]) -> float:
        return float(sum(t["bytes"] for t in rows))

    def kept(rows: list[dict[str, Any]]) -> float:
        vals = [v for v in (kept_fraction(t) for t in rows) if v is not None]
        return sum(vals) / len(vals) if vals else math.nan

    with_err = bool(tensors) and tensors[0].get("sq_error") is not None

    def energy(rows: list[dict[str, Any]]) -> float:
        sq = sum(t["sq_norm"] for t in rows)
        return 1.0 - sum(t["sq_error"] for t in rows) / sq if sq > 0 else math.nan

    fig, axes = plt.subplots(3, 1, figsize=(SIZE[0] / _DPI, SIZE[1] / _DPI), dpi=_DPI)
    x = list(range(len(layers)))
    labels = [("layer " + layer) if layer.isdigit() else "outside layers" for layer in layers]
    width = 0.8 / max(1, len(roles))
    colors = plt.get_cmap("tab10")
    panels = [
        (axes[0], per(nbytes), "bytes stored", None, True),
        (axes[1], per(kept), "rank / full rank, or keep fraction", (0.0, 1.05), False),
    ]
    if with_err:
        panels.append((axes[2], per(energy), "energy of Δ kept  1 − ‖Δ−Δ̂‖²/‖Δ‖²", (0, 1.05), False))
    for ax, values, ylabel, ylim, stacked in panels:
        bottom = [0.0] * len(layers)
        for i, role in enumerate(roles):
            ys = values[role]
            if stacked:
                clean = [0.0 if math.isnan(y) else y for y in ys]
                ax.bar(x, clean, 0.6, bottom=bottom, label=role, color=colors(i))
                bottom = [b + y for b, y in zip(bottom, clean, strict=True)]
            else:
                offs = [xi - 0.4 + width * (i + 0.5) for xi in x]
                ax.bar(offs, ys, width, label=role, color=colors(i))
        ax.set_ylabel(ylabel)
        ax.set_xticks(x, labels)
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(title="role", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if not with_err:
        axes[2].axis("off")
        axes[2].text(
            0.5,
            0.5,
            "energy kept: unknown (give --base and --source, or inspect pack:NAME of a recipe)",
            ha="center",
            va="center",
        )
    head = title or Path(report["pack"]).name
    summary = (
        f"{report['payload_bytes']:,} bytes of payload, {report['size_vs_fp16']:.2%} of the fp16 "
        "delta" + (f", relative error {report['rel_error']:.4f}" if with_err else "")
    )
    fig.suptitle(f"{head}\n{summary}")
    fig.subplots_adjust(left=0.08, right=0.88, top=0.9, bottom=0.05, hspace=0.35)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    plt.close(fig)
    return buf.getvalue()
