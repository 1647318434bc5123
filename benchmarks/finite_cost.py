"""What the finiteness check on written tensors costs (issue 15, principle 4), measured in
process so that a loaded machine's noise between whole builds does not hide it.

    python benchmarks/make_models.py /tmp/gb-fin/models --size 3gb
    python benchmarks/finite_cost.py /tmp/gb-fin/models/base --reps 3

For every tensor of a model folder (read warm, through the same copy-on-write maps the fuse
uses): the time of ``check_finite`` (what every written tensor now passes) against the time of
the rest of a plain sum fuse's per-tensor work on one thread (float32 copy of the base, one
``add_`` of a same-sized delta, cast back). Medians over ``--reps`` passes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from graftbuild.weights.tensors import ModelWeights, check_finite


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)  # as a build's steps run (weights/determinism.py)
    check_s: list[float] = []
    fuse_s: list[float] = []
    with ModelWeights(args.folder) as mw:
        names = mw.names()
        nbytes = sum(mw.infos[n].nbytes for n in names)
        for _ in range(args.reps + 1):  # the first pass warms the page cache
            c = f = 0.0
            for name in names:
                b = mw.map(name)
                t0 = time.perf_counter()
                acc = b.to(torch.float32, copy=True)
                acc.add_(b, alpha=0.5)  # stands for one decoded delta
                out = acc.to(b.dtype)
                t1 = time.perf_counter()
                check_finite(name, out)
                t2 = time.perf_counter()
                f += t1 - t0
                c += t2 - t1
                del b, acc, out
            check_s.append(c)
            fuse_s.append(f)
    check_s, fuse_s = check_s[1:], fuse_s[1:]
    res = {
        "folder": str(args.folder),
        "bytes": nbytes,
        "check_finite_s": round(statistics.median(check_s), 3),
        "fuse_math_s": round(statistics.median(fuse_s), 3),
        "check_vs_fuse_math": round(statistics.median(check_s) / statistics.median(fuse_s), 3),
        "check_gbps": round(nbytes / statistics.median(check_s) / 1e9, 2),
        "all": {"check_s": check_s, "fuse_math_s": fuse_s},
    }
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
