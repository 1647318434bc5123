"""What checking objects on every use costs a no-op build, against reading them in full.

Builds a recipe of synthetic model folders (``--mb`` MB of float32 weights each: a base and two
sources, exact packs, one fuse) in a scratch folder, then times, in this process:

- a no-op ``make`` (every object checked through the stat cache: stats, no reads);
- a ``make`` after deleting every output folder (unlinking changes the objects' ctime, so each
  object is re-read once, found intact and linked again);
- ``graftbuild fsck`` (every byte of every object and output read and hashed), the cost a no-op
  build would pay if it verified by reading.

    python benchmarks/integrity.py --mb 256
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

RECIPE = """
[project]
name = "integrity-bench"
cache = "cache"

[base]
path = "models/base"

[compression.default]
embed = "exact"
head = "exact"
attn = "exact"
mlp = "exact"
norm = "exact"
other = "exact"

[sources.x]
path = "models/x"

[sources.y]
path = "models/y"

[[fuse]]
name = "release"
packs = ["x", "y"]
"""


def synthetic_models(root: Path, mb: int) -> None:
    import torch
    from safetensors.torch import save_file

    n = max(1, mb // 8)  # 8 MB tensors
    g = torch.Generator().manual_seed(0)
    base = {
        f"model.layers.{i}.mlp.up_proj.weight": torch.randn(1024, 2048, generator=g)
        for i in range(n)
    }
    for name, scale in (("base", 0.0), ("x", 0.01), ("y", 0.02)):
        folder = root / "models" / name
        folder.mkdir(parents=True)
        tensors = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text('{"model_type": "synthetic"}\n')


def timed(fn) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=256, help="weights per model folder, in MB")
    args = ap.parse_args()

    from graftbuild.build.engine import Engine
    from graftbuild.build.graph import build_graph
    from graftbuild.cache.fsck import run_fsck
    from graftbuild.cache.store import Store
    from graftbuild.recipe import load_recipe

    root = Path(tempfile.mkdtemp(prefix="integrity-bench."))
    try:
        synthetic_models(root, args.mb)
        (root / "graftbuild.toml").write_text(RECIPE)

        def make():  # type: ignore[no-untyped-def]
            recipe = load_recipe(root / "graftbuild.toml")
            return Engine(recipe, Store(root / "cache")).make()

        t_build, _ = timed(make)
        objects = sum(
            p.stat().st_size for p in (root / "cache" / "objects").rglob("*") if p.is_file()
        )
        t_noop, r = timed(make)
        assert r.built == []  # type: ignore[attr-defined]
        shutil.rmtree(root / "out")
        t_restore, r = timed(make)
        assert r.built == []  # type: ignore[attr-defined]
        t_noop2, _ = timed(make)

        def fsck():  # type: ignore[no-untyped-def]
            store = Store(root / "cache")
            with store.lock():
                graph = build_graph(load_recipe(root / "graftbuild.toml"))
                return run_fsck(store, [(n.id, n.output) for n in graph.order() if n.output])

        t_fsck, report = timed(fsck)
        assert not report.problems  # type: ignore[attr-defined]
        read = report.bytes_read / 2**20  # type: ignore[attr-defined]
        count = len(list((root / "cache" / "objects").glob("*/*")))
        print(f"{args.mb} MB per model folder; objects: {objects / 2**20:.0f} MiB in {count}")
        print("| run | seconds | vs fsck |")
        print("|---|---:|---:|")
        print(f"| first build | {t_build:.2f} | |")
        print(f"| no-op make (stat checks) | {t_noop:.3f} | {t_noop / t_fsck:.3f}x |")
        ratio = t_restore / t_fsck
        print(f"| make after rm -rf out (objects re-read once) | {t_restore:.2f} | {ratio:.2f}x |")
        print(f"| no-op make after that | {t_noop2:.3f} | {t_noop2 / t_fsck:.3f}x |")
        print(f"| fsck (reads {read:.0f} MiB) | {t_fsck:.2f} | 1x |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
