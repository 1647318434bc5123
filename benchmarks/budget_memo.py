"""A calibrated budget pack with and without ``svd_memo`` (issue 22): the pack step's wall time
and its SVD count, side by side in one run, and whether the two packs have the same bytes.

With calibration a budget pack asks for each matrix's SVD four times: its rate model, the two
candidate allocations checked on the calibration text (loss-aware and uniform), and the pack
itself. ``svd_memo`` computes it once. The tiny causal models of compression.py (3.5M
parameters, trained there and cached in ``--cache``); the pack step as compression.py's
``alloc`` runs it.

Run: ``python benchmarks/budget_memo.py --cache /tmp/gb-bench`` (the cache compression.py
trains into).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench_common import logger, pack_step
from _bench_models import DATA, build_models
from compression import CALIB, SETTINGS


def main() -> None:
    import torch

    import graftbuild.compress.codecs._common as common

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "gb-bench")
    ap.add_argument("--ratios", default="16,64")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    log = logger()
    folders = build_models(args.cache, SETTINGS, log)
    skill = "code"
    calib = DATA / f"{skill}.train.txt"
    options: dict[str, Any] = {r: {"method": "mixed"} for r in ("embed", "head", "attn", "mlp")}
    options["calibration"] = {"data": calib, **CALIB}
    real_svd, calls = torch.linalg.svd, [0]

    def counting(*a: Any, **k: Any) -> Any:
        calls[0] += 1
        return real_svd(*a, **k)

    torch.linalg.svd = counting
    memo_bytes = common.SVD_MEMO_BYTES
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for ratio in [int(r) for r in args.ratios.split(",")]:
            times: dict[str, list[float]] = {"memo": [], "none": []}
            count: dict[str, int] = {}
            data: dict[str, bytes] = {}
            for i in range(args.rounds):
                for variant in ("memo", "none") if i % 2 == 0 else ("none", "memo"):
                    common.SVD_MEMO_BYTES = memo_bytes if variant == "memo" else 0
                    calls[0] = 0
                    out = Path(work) / f"{ratio}-{variant}-{i}"
                    t = time.perf_counter()
                    opts = {**options, "budget": 1 / ratio}
                    files = {"calibration": calib}
                    pack_step(folders["base"], folders[skill], opts, out, files, decode=False)
                    times[variant].append(time.perf_counter() - t)
                    count[variant] = calls[0]
                    data.setdefault(variant, (out / "skillpack.safetensors").read_bytes())
                    log(f"1/{ratio} {variant}: {times[variant][-1]:.2f}s, {calls[0]} SVDs")
            med = {v: statistics.median(t) for v, t in times.items()}
            rows.append(
                f"| 1/{ratio} | {med['none']:.2f} s ({count['none']}) | "
                f"{med['memo']:.2f} s ({count['memo']}) | {med['none'] / med['memo']:.2f}× | "
                f"{'yes' if data['memo'] == data['none'] else 'NO'} |"
            )
    common.SVD_MEMO_BYTES = memo_bytes
    print("| budget | pack step without memo (SVDs) | with memo (SVDs) | speed-up | same bytes |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
