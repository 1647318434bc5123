"""Repeated, interleaved rounds of (c): mergekit ``task_arithmetic``, graftbuild's fuse alone
(packs cached) and graftbuild's whole pipeline from the raw models (cold ``make`` in an empty
cache), medians and ratios. On a shared machine one pair of runs can land in different load;
interleaving the three in every round and taking medians makes the ratios steadier.

    python benchmarks/make_models.py /tmp/gb-bench/m07 --size 0.7gb
    python benchmarks/bench_fuse_rounds.py /tmp/gb-bench/m07 --work /tmp/gb-bench/r07 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from bench_fuse import MERGEKIT, WEIGHTS, write_recipe
from common import Run, competitor, graftbuild, timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", type=Path, help="folder with base/, x/, y/")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--results", type=Path)
    ap.add_argument("--clean", action="store_true", help="delete --work afterwards")
    args = ap.parse_args()
    models, work = args.models.resolve(), args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    j = ["-j", str(args.jobs)]
    cfg = work / "mergekit.yml"
    cfg.write_text(MERGEKIT.format(models=models, wx=WEIGHTS["x"], wy=WEIGHTS["y"]))
    recipe = write_recipe(work / "gb", models, "exact")
    timed("graftbuild make (packs for the fuse rounds)", graftbuild("make", str(recipe), *j), work)
    runs: dict[str, list[Run]] = {"mergekit": [], "fuse": [], "end_to_end": []}
    for i in range(args.rounds):
        shutil.rmtree(work / "mk", ignore_errors=True)
        runs["mergekit"].append(
            timed(
                "mergekit task_arithmetic", competitor("mergekit-yaml", str(cfg), str(work / "mk"))
            )
        )
        # a new shard size changes only the fuse's key: the packs are reused
        write_recipe(work / "gb", models, "exact", shard_size=2**40 + i + 1)
        shutil.rmtree(work / "gb" / "out")  # each run materialises its output afresh
        runs["fuse"].append(
            timed("graftbuild fuse alone", graftbuild("make", str(recipe), *j), work / "gb")
        )
        shutil.rmtree(work / "gb" / "out")
        runs["end_to_end"].append(
            timed(
                "graftbuild make, cold",
                graftbuild("make", str(recipe), "--cache", "cold-cache", *j),
                work / "gb",
            )
        )
        shutil.rmtree(work / "gb" / "cold-cache")
    med = {k: statistics.median(r.wall_s for r in v) for k, v in runs.items()}
    rss = {k: max(r.peak_rss_mb for r in v) for k, v in runs.items()}
    res = {
        "model_bytes": sum(f.stat().st_size for f in (models / "base").glob("*.safetensors")),
        "rounds": args.rounds,
        "runs": {k: [r.__dict__ for r in v] for k, v in runs.items()},
        "median_wall_s": med,
        "max_peak_rss_mb": rss,
        "ratios_vs_mergekit": {
            "fuse_only_wall": round(med["fuse"] / med["mergekit"], 3),
            "end_to_end_wall": round(med["end_to_end"] / med["mergekit"], 3),
            "fuse_only_peak_rss": round(rss["fuse"] / rss["mergekit"], 3),
            "end_to_end_peak_rss": round(rss["end_to_end"] / rss["mergekit"], 3),
        },
    }
    print(json.dumps(res, indent=1), flush=True)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(res, indent=1) + "\n")
    if args.clean:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
