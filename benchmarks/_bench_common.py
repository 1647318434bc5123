"""What the compression benchmarks share (compression.py on the tiny causal models,
skill_keep.py on all-MiniLM-L6-v2): the baselines at a byte budget, graftbuild's real pack
step, the per-matrix budget split, the progress log and the Markdown tables."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# --- baselines (benchmark only) ---------------------------------------------------------------


def svd_at(d: Any, nbytes: float) -> tuple[Any, int]:
    """Truncated SVD with fp16 factors, the rank that fits ``nbytes``."""
    import torch

    m, n = d.shape
    k = max(1, min(min(m, n), int(nbytes // ((m + n) * 2))))
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    a = (u[:, :k] * s[:k]).half().float()
    return a @ vh[:k].half().float(), k * (m + n) * 2


def magnitude_at(d: Any, nbytes: float) -> tuple[Any, int]:
    """The largest |Δ| entries, an int32 index and an fp16 value each."""
    import torch

    k = max(1, min(d.numel(), int(nbytes // 6)))
    flat = d.reshape(-1)
    idx = flat.abs().topk(k).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx].half().float()
    return out.view_as(d), k * 6


def dare_at(d: Any, nbytes: float, seed: int) -> tuple[Any, int]:
    """DARE: a random subset rescaled by 1 / keep-rate, an int32 index and an fp16 value each."""
    import torch

    k = max(1, min(d.numel(), int(nbytes // 6)))
    p = k / d.numel()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(d.numel(), generator=gen)[:k]
    flat = d.reshape(-1)
    out = torch.zeros_like(flat)
    out[idx] = (flat[idx] / p).half().float()
    return out.view_as(d), k * 6


def bitdelta(d: Any) -> tuple[Any, int]:
    """A sign bit per entry times one fp16 scale (mean |Δ|; no scale distillation)."""
    scale = float(d.abs().mean().half())
    return d.sign() * scale, math.ceil(d.numel() / 8) + 2


BASELINES = ("svd", "magnitude", "dare", "bitdelta")


def baseline_at(method: str, name: str, i: int, d: Any, nbytes: float) -> tuple[Any, int]:
    """One matrix (the i-th by name) by one of ``BASELINES`` at ``nbytes``."""
    if method == "svd":
        return svd_at(d, nbytes)
    if method == "magnitude":
        return magnitude_at(d, nbytes)
    if method == "dare":
        return dare_at(d, nbytes, seed=i)
    if method == "bitdelta":
        return bitdelta(d)
    raise ValueError(f"unknown baseline {method!r}")


def per_matrix(
    deltas: dict[str, Any], ratio: int, encode: Callable[[str, int, Any, float], tuple[Any, int]]
) -> tuple[dict[str, Any], int]:
    """(reconstructed deltas, bytes) at 1/ratio of the fp16 delta: 1-D tensors stored exactly
    (float32, counted), every matrix its share of what is left, given to ``encode(name, i,
    delta, nbytes)`` in name order."""
    total_fp16 = sum(2 * d.numel() for d in deltas.values())
    fixed = sum(4 * d.numel() for d in deltas.values() if d.ndim != 2)
    matrices = {k: d for k, d in deltas.items() if d.ndim == 2}
    share = (total_fp16 / ratio - fixed) / sum(2 * d.numel() for d in matrices.values())
    out = {k: d.clone() for k, d in deltas.items() if d.ndim != 2}
    used = fixed
    for i, (name, d) in enumerate(sorted(matrices.items())):
        out[name], b = encode(name, i, d, share * 2 * d.numel())
        used += b
    return out, used


# --- graftbuild --------------------------------------------------------------------------------


def pack_step(
    base: Path,
    src: Path,
    options: dict[str, Any],
    out: Path,
    files: dict[str, Path],
    decode: bool = True,
) -> tuple[dict[str, Any], int]:
    """graftbuild's real pack step with the compression profile ``options`` into ``out``:
    (every tensor's decoded delta, or nothing without ``decode``; the pack file's size, header
    included)."""
    from graftbuild.recipe import CompressionProfile
    from graftbuild.skillpack import PackReader
    from graftbuild.skillpack.format import PACK_FILE
    from graftbuild.steps.base import StepContext
    from graftbuild.steps.pack import PackStep

    profile = CompressionProfile.model_validate(options)
    out.mkdir(parents=True, exist_ok=True)
    ctx = StepContext(
        node_id="pack:bench",
        config={"profile": profile.normalised()},
        inputs={"base": base, "source": src},
        input_hashes={"base": "bench", "source": "bench"},
        files=files,
        out=out,
    )
    PackStep().run(ctx)
    if not decode:
        return {}, (out / PACK_FILE).stat().st_size
    with PackReader(out / PACK_FILE) as reader:
        rec = {name: reader.decode(name) for name in reader.names()}
    return rec, (out / PACK_FILE).stat().st_size


def load_state(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# --- harness ----------------------------------------------------------------------------------


def logger() -> Callable[[str], None]:
    """A progress line on stderr, prefixed with the seconds since this call."""
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    return log


def markdown_tables(
    results: list[dict[str, Any]],
    methods: list[str],
    ratios: list[int],
    heading: Callable[[dict[str, Any]], str],
    cell: Callable[[dict[str, Any]], str],
) -> str:
    """One table per skill (rows: methods, columns: 1/ratio) of the results' rows (those with a
    ``method``); ``heading`` titles a skill from its info row (the one without a method),
    ``cell`` formats a row; "—" where a method has no row."""
    rows = [r for r in results if "method" in r]
    lines = []
    for info in (r for r in results if "method" not in r):
        skill = info["skill"]
        lines.append(f"\n{heading(info)}\n")
        lines.append("| method | " + " | ".join(f"1/{r}" for r in ratios) + " |")
        lines.append("|---|" + "---|" * len(ratios))
        for method in methods:
            cells = []
            for ratio in ratios:
                key = (skill, ratio, method)
                hit = [r for r in rows if (r["skill"], r["ratio"], r["method"]) == key]
                cells.append(cell(hit[0]) if hit else "—")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def finish(results: list[dict[str, Any]], path: Path | None, table: str) -> None:
    """Write the raw results to ``path`` (if given) and print the tables."""
    if path:
        path.write_text(json.dumps(results, indent=1))
    print(table)
