"""Randomized against exact SVD for the ``lowrank`` codec: time and Frobenius error.

    python benchmarks/bench_svd.py

Matrices are delta-like: a rank-8 component plus dense noise (as in make_models.py), and pure
noise (flat spectrum, the randomized method's worst case). Error ratio = ‖Δ − Δ_k‖ of the
randomized factors over that of the exact truncated SVD (1.0 = optimal).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch

    from graftbuild.compress.codecs._common import randomized_svd, svd, use_randomized

    g = torch.Generator().manual_seed(0)
    for m, n in ((1024, 1024), (1024, 2816), (2816, 1024)):
        cases = {
            "rank8+noise": 0.002
            * (torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g))
            / 8
            + 0.0002 * torch.randn(m, n, generator=g),
            "noise": torch.randn(m, n, generator=g),
        }
        for kind, x in cases.items():
            t = time.perf_counter()
            u, s, vh = svd(x)
            exact_s = time.perf_counter() - t
            for k in (8, 32, 128):
                t = time.perf_counter()
                ur, sr, vr = randomized_svd(x, k)
                rand_s = time.perf_counter() - t
                best = torch.linalg.norm(x - (u[:, :k] * s[:k]) @ vh[:k])
                got = torch.linalg.norm(x - (ur * sr) @ vr)
                row = {
                    "shape": [m, n],
                    "kind": kind,
                    "k": k,
                    "chosen": use_randomized((m, n), k),
                    "exact_s": round(exact_s, 3),
                    "randomized_s": round(rand_s, 3),
                    "speedup": round(exact_s / rand_s, 1),
                    "error_ratio": round(float(got / best), 5),
                }
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
