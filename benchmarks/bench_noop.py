"""(a) no-op ``graftbuild make`` against a no-op ``dvc repro`` of the same pipeline, and
(b) first-build hashing throughput against a raw sequential read (``cat > /dev/null``).

    python benchmarks/make_models.py /tmp/gb-bench/noop/models --size 2gb
    python benchmarks/bench_noop.py /tmp/gb-bench/noop --reps 7

The project folder holds ``models/{base,x,y}`` (3 x ~2 GB). The pipeline: pack x and y (exact
codec), fuse them into ``out/fused/release``. DVC's stage runs that same ``graftbuild make`` with
the recipe and the three model folders as dependencies and the fused folder as its output
(``cache: false``: DVC only tracks it), so both tools check the same inputs and output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from common import PYTHON, Run, competitor, env, graftbuild, median, timed

RECIPE = """
[project]
name = "noop-bench"
cache = "cache"

[base]
path = "models/base"

[compression.exact]
embed = "exact"
head = "exact"
attn = "exact"
mlp = "exact"

[sources.x]
path = "models/x"
compression = "exact"

[sources.y]
path = "models/y"
compression = "exact"

[[fuse]]
name = "release"
packs = ["x", "y"]
weights = { x = 1.0, y = 0.5 }
"""

DVC_YAML = """stages:
  fuse:
    cmd: {python} -m graftbuild make graftbuild.toml
    deps:
      - graftbuild.toml
      - models/base
      - models/x
      - models/y
    outs:
      - out/fused/release:
          cache: false
"""


def setup(work: Path) -> None:
    (work / "graftbuild.toml").write_text(RECIPE)
    (work / "dvc.yaml").write_text(DVC_YAML.format(python=PYTHON))
    (work / ".dvcignore").write_text("cache/\nout/packs/\n")
    if not (work / ".dvc").is_dir():
        subprocess.run(competitor("dvc", "init", "--no-scm", "-f", "-q"), cwd=work, check=True)
        subprocess.run(competitor("dvc", "config", "core.analytics", "false"), cwd=work, check=True)


def weight_files(work: Path) -> list[Path]:
    return [work / "models" / m / "model.safetensors" for m in ("base", "x", "y")]


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (posix_fadvise DONTNEED; no root needed)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


HASH_PROBE = """
import sys, time
from pathlib import Path
from graftbuild.cache.hashing import StatCache
t = time.perf_counter()
cache = StatCache()
for d in sys.argv[1:]:
    cache.tree(Path(d))
print(time.perf_counter() - t)
"""


def hashing(work: Path, reps: int) -> dict:
    files = weight_files(work)
    total = sum(f.stat().st_size for f in files)
    folders = [str(f.parent) for f in files]
    out: dict[str, list[float]] = {"cat_warm": [], "hash_warm": [], "cat_cold": [], "hash_cold": []}

    def cat() -> float:
        t = time.perf_counter()
        subprocess.run(["sh", "-c", 'cat "$@" > /dev/null', "cat", *map(str, files)], check=True)
        return time.perf_counter() - t

    def hash_() -> float:
        res = subprocess.run(
            [PYTHON, "-c", HASH_PROBE, *folders], env=env(), capture_output=True, text=True
        )
        return float(res.stdout.strip())

    cat()  # warm the page cache
    for _ in range(reps):  # interleaved, side by side
        out["cat_warm"].append(cat())
        out["hash_warm"].append(hash_())
    for _ in range(max(2, reps // 2)):
        evict(files)
        out["cat_cold"].append(cat())
        evict(files)
        out["hash_cold"].append(hash_())
    result = {"bytes": total}
    for k, v in out.items():
        result[k + "_gbps"] = round(total / statistics.median(v) / 1e9, 3)
        result[k + "_s"] = [round(x, 3) for x in v]
    result["ratio_warm"] = round(result["hash_warm_gbps"] / result["cat_warm_gbps"], 3)
    result["ratio_cold"] = round(result["hash_cold_gbps"] / result["cat_cold_gbps"], 3)
    print(json.dumps(result), flush=True)
    return result


def noop(work: Path, reps: int) -> dict:
    setup(work)
    first = timed("graftbuild make (first build)", graftbuild("make", "graftbuild.toml"), work)
    dvc_first = timed("dvc repro (first: md5 of the inputs)", competitor("dvc", "repro"), work)
    runs: dict[str, list[Run]] = {
        "dvc": [],
        "make": [],
        "plan": [],
        "make_planner": [],
        "python": [],
    }
    for _ in range(reps):  # interleaved, side by side
        runs["dvc"].append(timed("dvc repro (no-op)", competitor("dvc", "repro"), work))
        runs["make"].append(timed("graftbuild make (no-op)", graftbuild("make"), work))
        runs["plan"].append(timed("graftbuild plan (no-op)", graftbuild("plan"), work))
        runs["make_planner"].append(
            timed(
                "graftbuild --debug make (no-op, full planner)", graftbuild("--debug", "make"), work
            )
        )
        runs["python"].append(timed("python -c pass", [PYTHON, "-c", "pass"], work))
    res = {k: median(v) for k, v in runs.items()}
    res |= {
        "first_make_s": first.wall_s,
        "dvc_first_repro_s": dvc_first.wall_s,
        "ratio_make_vs_dvc": round(res["make"] / res["dvc"], 4),
        "ratio_plan_vs_dvc": round(res["plan"] / res["dvc"], 4),
        "ratio_planner_vs_dvc": round(res["make_planner"] / res["dvc"], 4),
        "all_s": {k: [r.wall_s for r in v] for k, v in runs.items()},
    }
    print(json.dumps(res), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path, help="project folder holding models/{base,x,y}")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--results", type=Path, help="write the JSON results here")
    ap.add_argument("--clean", action="store_true", help="delete the project folder afterwards")
    args = ap.parse_args()
    work = args.work.resolve()
    results = {"noop": noop(work, args.reps), "hashing": hashing(work, args.reps)}
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=1) + "\n")
    if args.clean:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
