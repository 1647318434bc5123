"""Comparing two artifact folders by value: for nodes whose bytes are not promised identical
(steps run on a GPU), ``verify`` and ``make --locked`` accept them within a stated tolerance.

Files other than safetensors must be byte-identical; tensors are compared name by name, as
``max |a − b| / max(max |b|, tiny)`` per tensor (the largest over all tensors is reported).
"""

from __future__ import annotations

import math
from pathlib import Path

from graftbuild.cache.hashing import hash_file, is_object_file, iter_files

GPU_TOLERANCE = 1e-3
"""Relative difference, per tensor, accepted between a GPU build and another build."""


def max_relative_difference(a: Path, b: Path) -> float:
    """The largest per-tensor relative difference between folders ``a`` and ``b`` (0.0: equal
    values; inf: they differ in files, tensor names, shapes, or any non-tensor file)."""
    import torch

    from graftbuild.weights.tensors import TensorFile

    files_a = {rel: p for rel, p in iter_files(a, is_object_file)}  # objects: every file
    files_b = {rel: p for rel, p in iter_files(b, is_object_file)}
    if set(files_a) != set(files_b):
        return math.inf
    worst = 0.0
    for rel, pa in sorted(files_a.items()):
        pb = files_b[rel]
        if not rel.endswith(".safetensors"):
            if hash_file(pa) != hash_file(pb):
                return math.inf
            continue
        ta, tb = TensorFile(pa), TensorFile(pb)
        try:
            if set(ta.infos) != set(tb.infos):
                return math.inf
            for name in sorted(ta.infos):
                x, y = ta.read(name), tb.read(name)
                if x.shape != y.shape:
                    return math.inf
                if not x.is_floating_point():
                    if not torch.equal(x, y):
                        return math.inf
                    continue
                x, y = x.double(), y.double()
                scale = max(float(y.abs().max()) if y.numel() else 0.0, 1e-30)
                diff = float((x - y).abs().max()) if x.numel() else 0.0
                worst = max(worst, diff / scale)
        finally:
            ta.close()
            tb.close()
    return worst
