"""No-op ``graftbuild make``/``plan`` of this checkout against another one (e.g. main before a
change), side by side with a no-op ``dvc repro`` of the same pipeline on the same inputs.

    python benchmarks/make_models.py /tmp/gb-ab/models --size 2gb
    BENCH_VENV=/work/venvs/dvc python benchmarks/ab_noop.py /tmp/gb-ab --other ../main-ref

Each checkout gets its own project folder (the model folders hard-linked from ``models/``, its
own cache and outputs: the no-op record of one version is not the other's), built once; then
interleaved rounds of: ``dvc repro`` (the bench_noop.py stage, in this checkout's project),
``make``, ``plan`` and ``--debug make`` (the full planner, no fast path) of each checkout, and
``python -c pass``. Medians, and each one's ratio to ``dvc repro``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from bench_noop import setup
from common import GNU_TIME, PYTHON, REPO, competitor


def run(label: str, cmd: list[str], cwd: Path, code: Path | None) -> float:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    if code is not None:
        env["PYTHONPATH"] = str(code)
    t0 = time.perf_counter()
    proc = subprocess.run([GNU_TIME, "-v", *cmd], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{label}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    print(json.dumps({"label": label, "wall_s": round(wall, 4), "rss_kb": rss and rss.group(1)}))
    return wall


def project(root: Path, name: str) -> Path:
    work = root / name
    if not (work / "models").is_dir():
        work.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-al", str(root / "models"), str(work / "models")], check=True)
    setup(work)
    return work


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path, help="folder holding models/{base,x,y}")
    ap.add_argument("--other", type=Path, required=True, help="the other checkout")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--results", type=Path)
    args = ap.parse_args()
    root = args.root.resolve()
    sides = {"this": REPO, "other": args.other.resolve()}
    works = {side: project(root, f"work-{side}") for side in sides}
    gb = [PYTHON, "-m", "graftbuild"]
    first = {
        side: run(f"{side}: first make", [*gb, "make"], works[side], code)
        for side, code in sides.items()
    }
    dvc_first = run("dvc repro (first)", competitor("dvc", "repro"), works["this"], REPO)
    times: dict[str, list[float]] = {}

    def add(key: str, cmd: list[str], side: str) -> None:
        times.setdefault(key, []).append(run(key, cmd, works[side], sides[side]))

    for _ in range(args.reps):
        add("dvc repro", competitor("dvc", "repro"), "this")
        for side in sides:
            add(f"{side}: make", [*gb, "make"], side)
            add(f"{side}: plan", [*gb, "plan"], side)
            add(f"{side}: --debug make (full planner)", [*gb, "--debug", "make"], side)
        add("python -c pass", [PYTHON, "-c", "pass"], "this")
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {
        "first_s": first,
        "dvc_first_s": dvc_first,
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "vs_dvc": {k: round(v / med["dvc repro"], 4) for k, v in med.items()},
        "this_vs_other": {
            what: round(med[f"this: {what}"] / med[f"other: {what}"], 3)
            for what in ("make", "plan", "--debug make (full planner)")
        },
        "all_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
    }
    print(json.dumps(res, indent=1))
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(res, indent=1) + "\n")
    for side in sides:
        shutil.rmtree(works[side], ignore_errors=True)


if __name__ == "__main__":
    main()
