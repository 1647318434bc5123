"""mergekit's ``slices``: a fused model whose layers are taken (and merged) from layer ranges of
the inputs, e.g. passthrough layer stacking ("frankenmerges") or a slerp of two ranges.

Output layer ``j`` of slice ``s`` (offset ``o`` in it) is the strategy applied to layer
``start + o`` of each of the slice's sources, with mergekit's gradient position
``t = o / (len − 1)``. Tensors outside the layers take the first slice's sources (embeddings) or
the last slice's (final norm, head), at ``t = 0``. A source is ``"base"`` or a pack's name; the
strategy sees the slice's base source (or, with none, the base model's tensor at the first
source's layer) as θ and every pack source as Δ'ᵢ = θᵢ − θ, θᵢ = its layer of base + Δ̂ᵢ.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_LAYER = re.compile(r"^(.*?(?:^|\.)(?:layers|h|blocks|layer)\.)(\d+)(\..*)$")
_PRE = ("embed", "wte", "wpe")


@dataclass(frozen=True)
class Planned:
    """One output tensor: its inputs (``"base"`` or a pack index, and the input tensor's name),
    the tensor the strategy treats as θ, and the gradient position."""

    inputs: tuple[tuple[str | int, str], ...]
    base_name: str
    t: float


def plan(
    names: list[str], slices: list[dict[str, Any]], packs: list[str]
) -> tuple[dict[str, Planned], int]:
    """Output tensor name -> Planned, in output order; and the output's layer count."""
    layers: dict[int, list[tuple[str, str, str]]] = {}  # layer -> [(prefix, suffix, name)]
    others: list[str] = []
    for n in names:
        m = _LAYER.match(n)
        if m is None:
            others.append(n)
        else:
            layers.setdefault(int(m.group(2)), []).append((m.group(1), m.group(3), n))

    def ref(model: str) -> str | int:
        return "base" if model == "base" else packs.index(model)

    def planned(sources: list[tuple[str | int, str]], t: float) -> Planned:
        base = next((name for who, name in sources if who == "base"), sources[0][1])
        return Planned(tuple(sources), base, t)

    out: dict[str, Planned] = {}
    pre = [n for n in others if any(p in n for p in _PRE)]
    post = [n for n in others if n not in pre]
    first = [ref(s["model"]) for s in slices[0]["sources"]]
    last = [ref(s["model"]) for s in slices[-1]["sources"]]
    for n in pre:
        out[n] = planned([(who, n) for who in first], 0.0)
    j = 0
    for s in slices:
        srcs = s["sources"]
        length = srcs[0]["layer_range"][1] - srcs[0]["layer_range"][0]
        for o in range(length):
            t = o / (length - 1) if length > 1 else 1.0
            for prefix, suffix, _name in layers.get(srcs[0]["layer_range"][0] + o, []):
                inputs = [
                    (ref(src["model"]), f"{prefix}{src['layer_range'][0] + o}{suffix}")
                    for src in srcs
                ]
                out[f"{prefix}{j}{suffix}"] = planned(inputs, t)
            j += 1
    for n in post:
        out[n] = planned([(who, n) for who in last], 0.0)
    return out, j


def check(slices: list[dict[str, Any]], packs: list[str], num_layers: int) -> None:
    """Every source names "base" or a pack, within the base's layers, and a slice's sources
    span equally many layers (raises ValueError)."""
    for i, s in enumerate(slices):
        lengths = set()
        for k, src in enumerate(s["sources"]):
            where = f"slices[{i}].sources[{k}]"
            if src["model"] != "base" and src["model"] not in packs:
                raise ValueError(f"{where}.model: {src['model']!r} is neither 'base' nor a pack")
            a, b = src["layer_range"]
            if not 0 <= a < b <= num_layers:
                raise ValueError(
                    f"{where}.layer_range: [{a}, {b}] is not within the base's {num_layers} layers"
                )
            lengths.add(b - a)
        if len(lengths) > 1:
            raise ValueError(f"slices[{i}]: its sources span different numbers of layers")
