"""Repeated, interleaved rounds of (c): mergekit ``task_arithmetic``, graftbuild's fuse alone
(packs cached) and graftbuild's whole pipeline from the raw models (cold ``make`` in an empty
cache), each graftbuild run both as it runs by default (deferred durability: objects are left to
the kernel's writeback, like mergekit's output) and with ``--fsync`` (every object on disk before
it enters the cache); medians and ratios. On a shared machine one pair of runs can land in
different load; interleaving them in every round and taking medians makes the ratios steadier.

Every command is followed by a ``sync`` (timed apart), so none starts while the disk is still
writing the previous one's output; "+ sync" figures add that sync to the command's time: the
same work with its output made durable.

    python benchmarks/make_models.py /tmp/gb-bench/m07 --size 0.7gb
    python benchmarks/bench_fuse_rounds.py /tmp/gb-bench/m07 --work /tmp/gb-bench/r07 --rounds 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from bench_fuse import MERGEKIT, WEIGHTS, write_recipe
from common import Run, competitor, graftbuild, publish, timed


def synced(label: str, cmd: list[str], cwd: Path, syncs: dict[str, list[float]]) -> Run:
    """``timed`` then ``sync``; the sync's wall time is recorded under ``label``."""
    run = timed(label, cmd, cwd)
    t0 = time.perf_counter()
    subprocess.run(["sync"], check=True)
    syncs.setdefault(label, []).append(round(time.perf_counter() - t0, 3))
    return run


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
    syncs: dict[str, list[float]] = {}
    synced("packs", graftbuild("make", str(recipe), *j), work, syncs)
    runs: dict[str, list[Run]] = {
        k: [] for k in ("mergekit", "fuse", "fuse_fsync", "end_to_end", "end_to_end_fsync")
    }
    for i in range(args.rounds):
        shutil.rmtree(work / "mk", ignore_errors=True)
        runs["mergekit"].append(
            synced("mergekit", competitor("mergekit-yaml", str(cfg), str(work / "mk")), work, syncs)
        )
        for label, flags in (("fuse", []), ("fuse_fsync", ["--fsync"])):
            # a new shard size changes only the fuse's key: the packs are reused
            write_recipe(work / "gb", models, "exact", shard_size=2**40 + 2 * i + len(flags) + 1)
            shutil.rmtree(work / "gb" / "out", ignore_errors=True)  # materialised afresh
            cmd = graftbuild("make", str(recipe), *j, *flags)
            runs[label].append(synced(label, cmd, work / "gb", syncs))
        for label, flags in (("end_to_end", []), ("end_to_end_fsync", ["--fsync"])):
            shutil.rmtree(work / "gb" / "out", ignore_errors=True)
            cmd = graftbuild("make", str(recipe), "--cache", "cold-cache", *j, *flags)
            runs[label].append(synced(label, cmd, work / "gb", syncs))
            shutil.rmtree(work / "gb" / "cold-cache")
    med = {k: statistics.median(r.wall_s for r in v) for k, v in runs.items()}
    for k, v in runs.items():
        med[f"{k}_plus_sync"] = statistics.median(
            r.wall_s + s for r, s in zip(v, syncs[k], strict=True)
        )
    rss = {k: max(r.peak_rss_mb for r in v) for k, v in runs.items()}
    mk, mks = med["mergekit"], med["mergekit_plus_sync"]
    res = {
        "model_bytes": sum(f.stat().st_size for f in (models / "base").glob("*.safetensors")),
        "rounds": args.rounds,
        "runs": {k: [r.__dict__ for r in v] for k, v in runs.items()},
        "median_wall_s": med,
        "syncs_s": syncs,
        "max_peak_rss_mb": rss,
        "ratios_vs_mergekit": {
            "fuse_only_wall": round(med["fuse"] / mk, 3),
            "fuse_only_fsync_wall": round(med["fuse_fsync"] / mk, 3),
            "end_to_end_wall": round(med["end_to_end"] / mk, 3),
            "end_to_end_fsync_wall": round(med["end_to_end_fsync"] / mk, 3),
            "fuse_only_plus_sync_vs_mergekit_plus_sync": round(med["fuse_plus_sync"] / mks, 3),
            "end_to_end_plus_sync_vs_mergekit_plus_sync": round(
                med["end_to_end_plus_sync"] / mks, 3
            ),
            "fuse_only_peak_rss": round(rss["fuse"] / rss["mergekit"], 3),
            "end_to_end_peak_rss": round(rss["end_to_end"] / rss["mergekit"], 3),
        },
    }
    publish(res, args.results)
    if args.clean:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
