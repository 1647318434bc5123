"""Which nodes reproduce to the byte across thread counts and devices?

Builds one recipe from scratch several times, each into its own temporary cache (nothing is
materialised, the recipe's lockfile is not touched), under different execution settings, and
prints each node's output hash per run and whether all runs agree.

    python benchmarks/determinism.py recipes/quickstart.toml --runs cpu:1 cpu:1 cpu:2
    python benchmarks/determinism.py recipes/quickstart.toml --runs cpu:4 cuda:4

A run is DEVICE:THREADS (THREADS "default" leaves torch's default). Results and the command go
into docs/REPRODUCIBILITY.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def build(recipe_path: Path, device: str, threads: int | None) -> tuple[dict[str, str], float]:
    from graftbuild.build.engine import Engine
    from graftbuild.cache.store import Store
    from graftbuild.recipe import load_recipe
    from graftbuild.steps.base import BuildSettings

    recipe = load_recipe(recipe_path)
    with tempfile.TemporaryDirectory(prefix="determinism.") as tmp:
        sched = Engine(recipe, Store(Path(tmp)), BuildSettings(device=device, threads=threads))
        sched.write_lock = False
        for nid in sched.graph.graph:
            sched.graph.node(nid).output = None
        start = time.perf_counter()
        result = sched.make()
        return {n.id: n.output_hash or "-" for n in result.nodes}, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--runs", nargs="+", default=["cpu:1", "cpu:1", "cpu:2"])
    args = ap.parse_args()
    runs = []
    for spec in args.runs:
        device, _, threads = spec.partition(":")
        n = None if threads in ("", "default") else int(threads)
        hashes, seconds = build(args.recipe, device, n)
        print(f"run {spec}: {seconds:.1f} s", flush=True)
        runs.append((spec, hashes))
    print()
    print("| node | " + " | ".join(s for s, _ in runs) + " | all equal |")
    print("|---|" + "---|" * (len(runs) + 1))
    for node in runs[0][1]:
        values = [h[node][:8] for _, h in runs]
        same = "yes" if len(set(values)) == 1 else "NO"
        print(f"| {node} | " + " | ".join(values) + f" | {same} |")


if __name__ == "__main__":
    main()
