"""Shared by the benchmarks: which interpreters run what, and timing a command with its peak RSS.

graftbuild runs from this worktree with the project's venv; the competitors (dvc, mergekit) run
from the benchmark's own venv (``BENCH_VENV``, default /work/bench-venv), never as dependencies.
Every measured command goes through ``/usr/bin/time -v`` so wall time and peak RSS come from the
same tool for every side.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable  # the venv graftbuild is installed in
BENCH_VENV = Path(os.environ.get("BENCH_VENV", "/work/bench-venv"))
GNU_TIME = "/usr/bin/time"


def env() -> dict[str, str]:
    """graftbuild resolves to this worktree; OpenMP threads wait passively (shared machine)."""
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_WAIT_POLICY="PASSIVE")


def graftbuild(*args: str) -> list[str]:
    return [PYTHON, "-m", "graftbuild", *args]


def competitor(tool: str, *args: str) -> list[str]:
    return [str(BENCH_VENV / "bin" / tool), *args]


@dataclass
class Run:
    label: str
    wall_s: float
    peak_rss_mb: float
    code: int
    node_s: dict[str, float] | None = None
    """Each node's own wall seconds, when the command was ``graftbuild make --json``."""


def timed(label: str, cmd: list[str], cwd: Path | None = None, check: bool = True) -> Run:
    """Run ``cmd`` under ``/usr/bin/time -v``; wall seconds and peak RSS (MB) of the tree's
    largest process (time -v reports the maximum resident set of the command and its waited-for
    children)."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [GNU_TIME, "-v", *cmd], cwd=cwd, env=env(), capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if check and proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{label}: exit {proc.returncode}: {' '.join(cmd)}")
    run = Run(
        label, round(wall, 4), round(int(rss.group(1)) / 1024, 1) if rss else -1, proc.returncode
    )
    if "--json" in cmd and proc.returncode == 0:  # make's report: per-node seconds
        report = json.loads(proc.stdout)
        run.node_s = {n["id"]: n["seconds"] for n in report["nodes"] if n["seconds"]}
    print(json.dumps(asdict(run)), flush=True)
    return run


def median(runs: list[Run]) -> float:
    return statistics.median(r.wall_s for r in runs)


def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}x"


def publish(res: dict, path: Path | None) -> None:
    """Print a benchmark's results and, given a path, write them there as JSON."""
    print(json.dumps(res, indent=1), flush=True)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1) + "\n")
