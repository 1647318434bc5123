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

The physical floor (issue 21): ``--floor`` adds to every round ``cp -r`` of the base folder (read
and write one model) and ``cat`` of base + sources to /dev/null (read the inputs once), the least
any fuse can do. Both, and every fuse-alone run, start with the inputs in the page cache, and
``cp`` writes onto just-freed pages as the fuse does (an untimed copy, deleted, first).
``--baseline SRC`` runs graftbuild's fuse alone and cold make a second time from
another source tree (``git archive COMMIT | tar -x -C SRC``: the code before a change), in the same
rounds, for time and peak RSS side by side; the fused bytes of both are compared.
``--no-fsync`` leaves out the ``--fsync`` variants (shorter rounds).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from bench_fuse import MERGEKIT, WEIGHTS, write_recipe
from common import PYTHON, Run, competitor, graftbuild, publish, timed


def baseline_graftbuild(src: Path, *args: str) -> list[str]:
    """graftbuild run from another source tree (``env`` overrides the benchmark's PYTHONPATH)."""
    return ["env", f"PYTHONPATH={src}", PYTHON, "-m", "graftbuild", *args]


def file_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while chunk := fh.read(16 << 20):
                h.update(chunk)
    return h.hexdigest()


def drop_model_sized_objects(cache: Path, min_bytes: int) -> None:
    """Delete the store's objects of at least ``min_bytes`` (fused models; the reference packs
    are kilobytes)."""
    for obj in (cache / "objects").glob("*/*"):
        if sum(f.stat().st_size for f in obj.rglob("*") if f.is_file()) >= min_bytes:
            shutil.rmtree(obj)


def warm_inputs(files: list[str]) -> None:
    """Read ``files`` once, untimed, so the next command finds them in the page cache."""
    subprocess.run(["sh", "-c", 'cat "$@" > /dev/null', "cat", *files], check=True)


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
    ap.add_argument("--floor", action="store_true", help="cp of the base, cat of all inputs")
    ap.add_argument("--baseline", type=Path, help="another graftbuild source tree, same rounds")
    ap.add_argument("--no-fsync", action="store_true", help="leave out the --fsync variants")
    ap.add_argument(
        "--no-mergekit",
        action="store_true",
        help="leave mergekit out (its 3 GB run needs 13 GB of RAM): the floor ratios only",
    )
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
    base_src = args.baseline.resolve() if args.baseline else None
    if base_src is not None:  # the baseline's packs, in a cache of its own
        cmd = baseline_graftbuild(base_src, "make", str(recipe), "--cache", "base-cache", *j)
        synced("baseline_packs", cmd, work / "gb", syncs)
    fsync_variants = [] if args.no_fsync else [["--fsync"]]
    labels = ([] if args.no_mergekit else ["mergekit"]) + ["fuse", "end_to_end"]
    labels += [] if args.no_fsync else ["fuse_fsync", "end_to_end_fsync"]
    labels += ["baseline_fuse", "baseline_end_to_end"] if base_src else []
    labels += ["cp_base", "cat_inputs"] if args.floor else []
    runs: dict[str, list[Run]] = {k: [] for k in labels}
    inputs = sorted(str(f) for m in ("base", "x", "y") for f in (models / m).glob("*.safetensors"))
    digests: dict[str, set[str]] = {}
    model_bytes = sum(f.stat().st_size for f in (models / "base").glob("*.safetensors"))
    for i in range(args.rounds):
        # mergekit and the cold pipelines first, under the same conditions; then the floor and
        # the fuse alone, each after its inputs are read into the page cache
        if not args.no_mergekit:
            shutil.rmtree(work / "mk", ignore_errors=True)
            cmd = competitor("mergekit-yaml", str(cfg), str(work / "mk"))
            runs["mergekit"].append(synced("mergekit", cmd, work, syncs))
            shutil.rmtree(work / "mk", ignore_errors=True)
        sides = [("end_to_end", graftbuild, [])]
        sides += [("end_to_end_fsync", graftbuild, f) for f in fsync_variants]
        if base_src is not None:
            sides.append(("baseline_end_to_end", lambda *a: baseline_graftbuild(base_src, *a), []))
        for label, tool, flags in sides:
            shutil.rmtree(work / "gb" / "out", ignore_errors=True)
            cmd = tool("make", str(recipe), "--cache", "cold-cache", *j, *flags, "--json")
            runs[label].append(synced(label, cmd, work / "gb", syncs))
            shutil.rmtree(work / "gb" / "cold-cache")
        if args.floor:
            # cp under the fuse's conditions: its inputs in the page cache, and its output
            # written onto pages the kernel just freed (the fuse's previous output is deleted
            # right before it runs). An untimed copy, deleted, gives cp the same: on this VM the
            # first writer onto pages the guest has not touched lately pays the host's faults
            # (a 3 GB cp took 6.8-7.7 s so, 0.9-1.1 s after a deleted copy).
            warm_inputs(inputs)
            subprocess.run(["cp", "-r", str(models / "base"), str(work / "cp")], check=True)
            shutil.rmtree(work / "cp")
            cmd = ["cp", "-r", str(models / "base"), str(work / "cp")]
            runs["cp_base"].append(synced("cp_base", cmd, work, syncs))
            shutil.rmtree(work / "cp")  # each output deleted once timed: a model's worth of disk
            cmd = ["sh", "-c", 'cat "$@" > /dev/null', "cat", *inputs]
            runs["cat_inputs"].append(synced("cat_inputs", cmd, work, syncs))
        sides = [("fuse", graftbuild, "cache", [])]
        sides += [("fuse_fsync", graftbuild, "cache", f) for f in fsync_variants]
        if base_src is not None:
            sides.append(
                ("baseline_fuse", lambda *a: baseline_graftbuild(base_src, *a), "base-cache", [])
            )
        for n, (label, tool, cache, flags) in enumerate(sides):
            # a new shard size changes only the fuse's key: the packs are reused
            write_recipe(work / "gb", models, "exact", shard_size=2**40 + 8 * i + n + 1)
            shutil.rmtree(work / "gb" / "out", ignore_errors=True)  # materialised afresh
            # the earlier rounds' fused models leave the store, untimed: else this fuse finds
            # its bytes already stored, drops its own copy unwritten and skips writing back,
            # which `cp` (whose copy is kept until timed and synced) cannot
            drop_model_sized_objects(work / "gb" / cache, model_bytes // 2)
            if args.floor:
                warm_inputs(inputs)  # as for cp: the inputs in the page cache
            cmd = tool("make", str(recipe), "--cache", cache, *j, *flags, "--json")
            runs[label].append(synced(label, cmd, work / "gb", syncs))
            digests.setdefault(label, set()).add(
                file_digest(work / "gb" / "out" / "fused" / "fused")
            )
            shutil.rmtree(work / "gb" / "out", ignore_errors=True)
            if base_src is None:  # (both sides share the lockfile: gc would drop the packs)
                # the previous rounds' fused objects, untimed: the packs and this one stay
                cmd = tool("gc", str(recipe), "--cache", cache)
                subprocess.run(cmd, cwd=work / "gb", check=True, capture_output=True)
    med = {k: statistics.median(r.wall_s for r in v) for k, v in runs.items()}
    for k, v in runs.items():
        med[f"{k}_plus_sync"] = statistics.median(
            r.wall_s + s for r, s in zip(v, syncs[k], strict=True)
        )
    # the fuse node's own seconds, process start (interpreter, imports, planning) left out
    step = {
        f"{k}_step": statistics.median(r.node_s["fuse:fused"] for r in v)
        for k, v in runs.items()
        if v and v[0].node_s and "fuse:fused" in v[0].node_s and "end_to_end" not in k
    }
    med |= step
    rss = {k: max(r.peak_rss_mb for r in v) for k, v in runs.items()}
    mk, mks = med.get("mergekit", float("nan")), med.get("mergekit_plus_sync", float("nan"))
    mk_rss = rss.get("mergekit", float("nan"))
    ratios = {
        "fuse_only_wall": round(med["fuse"] / mk, 3),
        "end_to_end_wall": round(med["end_to_end"] / mk, 3),
        "fuse_only_plus_sync_vs_mergekit_plus_sync": round(med["fuse_plus_sync"] / mks, 3),
        "end_to_end_plus_sync_vs_mergekit_plus_sync": round(med["end_to_end_plus_sync"] / mks, 3),
        "fuse_only_peak_rss": round(rss["fuse"] / mk_rss, 3),
        "end_to_end_peak_rss": round(rss["end_to_end"] / mk_rss, 3),
    }
    if not args.no_fsync:
        ratios["fuse_only_fsync_wall"] = round(med["fuse_fsync"] / mk, 3)
        ratios["end_to_end_fsync_wall"] = round(med["end_to_end_fsync"] / mk, 3)
    if base_src is not None:
        ratios["baseline_fuse_only_wall"] = round(med["baseline_fuse"] / mk, 3)
        ratios["baseline_end_to_end_wall"] = round(med["baseline_end_to_end"] / mk, 3)
    floor = {}
    if args.floor:
        floor = {
            "fuse_vs_cp_base": round(med["fuse"] / med["cp_base"], 3),
            "fuse_plus_sync_vs_cp_plus_sync": round(
                med["fuse_plus_sync"] / med["cp_base_plus_sync"], 3
            ),
            "fuse_vs_cat_inputs": round(med["fuse"] / med["cat_inputs"], 3),
            "fuse_step_vs_cp_base": round(med["fuse_step"] / med["cp_base"], 3),
            "fuse_step_plus_sync_vs_cp_plus_sync": round(
                (med["fuse_step"] + statistics.median(syncs["fuse"])) / med["cp_base_plus_sync"], 3
            ),
            "mergekit_vs_cp_base": round(mk / med["cp_base"], 3),
            "end_to_end_vs_cp_base": round(med["end_to_end"] / med["cp_base"], 3),
        }
        if base_src is not None:
            floor["baseline_fuse_vs_cp_base"] = round(med["baseline_fuse"] / med["cp_base"], 3)
            floor["baseline_fuse_step_vs_cp_base"] = round(
                med["baseline_fuse_step"] / med["cp_base"], 3
            )
    res = {
        "model_bytes": model_bytes,
        "rounds": args.rounds,
        "baseline": str(base_src) if base_src else None,
        "runs": {k: [r.__dict__ for r in v] for k, v in runs.items()},
        "median_wall_s": med,
        "syncs_s": syncs,
        "max_peak_rss_mb": rss,
        "ratios_vs_mergekit": ratios,
        "floor": floor,
        "fused_digests": {k: sorted(v) for k, v in digests.items()},
        "same_fused_bytes": len(set().union(*digests.values())) == 1 if digests else None,
    }
    publish(res, args.results)
    if args.clean:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
