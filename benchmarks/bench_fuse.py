"""(c) fusing two sources: graftbuild ``sum`` (exact codec) against mergekit
``task_arithmetic`` and graftbuild ``ties`` against mergekit ``ties``, wall time and peak RSS,
plus the same fuse from compressed packs; (d) the pack build's peak RSS (run this at two model
sizes and compare).

    python benchmarks/make_models.py /tmp/gb-bench/m07 --size 0.7gb
    python benchmarks/bench_fuse.py /tmp/gb-bench/m07 --work /tmp/gb-bench/f07

Both tools read the same three model folders and write float32 output. mergekit runs with its
defaults (CPU). graftbuild runs its whole pipeline from the raw models (pack x, pack y, fuse) in
one cold ``make``; then the fuse alone (packs cached) and the packs alone. The exact-codec fused
model must equal mergekit's output to float tolerance (a correctness check, done tensor by
tensor here). ``ties`` runs with the same density, weights and scale on both sides (``TIES``);
its outputs may differ by design, and how far they are apart is measured and reported.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from common import Run, competitor, graftbuild, publish, timed

from graftbuild.weights.tensors import ModelWeights

WEIGHTS = {"x": 1.0, "y": 0.5}

RECIPE = """
[project]
name = "fuse-bench"
cache = "cache"

[base]
path = "{models}/base"

[compression.exact]
embed = "exact"
head = "exact"
attn = "exact"
mlp = "exact"

[compression.compressed]
embed = {{ method = "prune", keep = 0.1 }}
head = {{ method = "prune", keep = 0.1 }}
attn = {{ method = "lowrank", energy = 0.9, max_rank = 32 }}
mlp = {{ method = "lowrank", energy = 0.9, max_rank = 32 }}

[sources.x]
path = "{models}/x"
compression = "{profile}"

[sources.y]
path = "{models}/y"
compression = "{profile}"

[[fuse]]
name = "fused"
packs = ["x", "y"]
weights = {{ x = {wx}, y = {wy} }}
{fuse_extra}"""  # + shard_size

MERGEKIT = """merge_method: task_arithmetic
base_model: {models}/base
models:
  - model: {models}/x
    parameters:
      weight: {wx}
  - model: {models}/y
    parameters:
      weight: {wy}
dtype: float32
"""

# TIES on both sides with the same density and scale, and weights of 1: mergekit's ties divides
# by the sum of the agreeing weights (normalize, its default), graftbuild's by their count, so
# they agree when the weights are equal (see docs/BENCHMARKS.md). mergekit trims Δ, graftbuild
# w·Δ: the same entries for w > 0.
TIES = {"density": 0.2, "weight": 1.0, "lambda": 1.0}
MERGEKIT_TIES = """merge_method: ties
base_model: {models}/base
models:
  - model: {models}/x
    parameters:
      weight: {w}
      density: {density}
  - model: {models}/y
    parameters:
      weight: {w}
      density: {density}
parameters:
  normalize: true
  lambda: {lam}
dtype: float32
"""
GRAFTBUILD_TIES = (  # graftbuild's own rule, which the published numbers measured
    'strategy = "ties"\noptions = {{ density = {density}, scale = {lam}, rule = "graftbuild" }}\n'
)


def write_recipe(
    work: Path, models: Path, profile: str, shard_size: int = 2**40, ties: bool = False
) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    recipe = work / "graftbuild.toml"
    if ties:
        w = {"wx": TIES["weight"], "wy": TIES["weight"]}
        extra = GRAFTBUILD_TIES.format(density=TIES["density"], lam=TIES["lambda"])
    else:
        w, extra = {"wx": WEIGHTS["x"], "wy": WEIGHTS["y"]}, ""
    text = RECIPE.format(models=models, profile=profile, fuse_extra=extra, **w)
    recipe.write_text(text + f"shard_size = {shard_size}\n")
    return recipe


def graftbuild_pipeline(
    models: Path, work: Path, profile: str, jobs: int, end_to_end: bool, ties: bool = False
) -> dict[str, Run]:
    """``end_to_end``: one cold ``make`` (packs and fuse in one process) first. Then the fuse
    alone (a new shard size changes only the fuse's key; the bytes stay the same) and the packs
    alone in a fresh cache (their peak RSS, for (d)); with ``ties``, no packs alone (the same
    packs as ``sum``'s)."""
    j = ["-j", str(jobs)]
    runs: dict[str, Run] = {}
    recipe = write_recipe(work, models, profile, ties=ties)
    what = "ties" if ties else profile
    if end_to_end:
        runs["end_to_end"] = timed(
            f"graftbuild make, cold ({what}: pack x, pack y, fuse)",
            graftbuild("make", str(recipe), *j),
            work,
        )
    if ties:
        write_recipe(work, models, profile, shard_size=2**40 + 1, ties=True)
        runs["fuse"] = timed(
            "graftbuild `ties` fuse alone from exact packs",
            graftbuild("make", str(recipe), *j),
            work,
        )
        return runs
    # After an end-to-end build the packs are cached: time them again in a scratch cache.
    scratch = ["--cache", "cache-packs"] if end_to_end else []
    runs["packs"] = timed(
        f"graftbuild pack x,y alone ({profile})",
        graftbuild("make", str(recipe), "pack:x", "pack:y", *scratch, *j),
        work,
    )
    shutil.rmtree(work / "cache-packs", ignore_errors=True)
    # The pack outputs now link to the scratch cache's (deleted) objects: left in place, the next
    # make would re-read them to check them against its own cache's objects.
    shutil.rmtree(work / "out", ignore_errors=True)
    write_recipe(work, models, profile, shard_size=2**40 + 1)
    runs["fuse"] = timed(
        f"graftbuild fuse alone from {profile} packs", graftbuild("make", str(recipe), *j), work
    )
    return runs


def compare(a: Path, b: Path) -> dict[str, float]:
    """Max absolute and relative difference over all tensors (read one at a time)."""
    worst_abs, worst_rel, n = 0.0, 0.0, 0
    with ModelWeights(a) as wa, ModelWeights(b) as wb:
        if set(wa.infos) != set(wb.infos):
            raise SystemExit(f"tensor names differ: {sorted(set(wa.infos) ^ set(wb.infos))[:5]}")
        for name in wa.names():
            x, y = wa.get(name).float(), wb.get(name).float()
            d = (x - y).abs().max().item()
            worst_abs = max(worst_abs, d)
            worst_rel = max(worst_rel, d / max(y.abs().max().item(), 1e-30))
            if not torch.allclose(x, y, rtol=1e-5, atol=1e-6):
                raise SystemExit(f"{name}: outputs differ beyond float tolerance (max {d})")
            n += 1
    return {"tensors": n, "max_abs_diff": worst_abs, "max_rel_diff": worst_rel}


def difference(a: Path, b: Path, base: Path) -> dict[str, float]:
    """How far two fused models are apart, for outputs that may differ by design: max |a − b|,
    the fraction of entries differing by more than 1e-6, and ‖a − b‖ / ‖b − base‖ (the
    difference against the merged delta's size), over all tensors read one at a time."""
    worst, differ, total, num, den = 0.0, 0, 0, 0.0, 0.0
    with ModelWeights(a) as wa, ModelWeights(b) as wb, ModelWeights(base) as w0:
        for name in wa.names():
            x, y, z = wa.get(name).double(), wb.get(name).double(), w0.get(name).double()
            d = (x - y).abs()
            worst = max(worst, d.max().item())
            differ += int(torch.count_nonzero(d > 1e-6))
            total += d.numel()
            num += float((d * d).sum())
            den += float(((y - z) ** 2).sum())
    return {
        "max_abs_diff": worst,
        "fraction_differing": differ / total,
        "relative_diff_of_merged_delta": (num / den) ** 0.5 if den else 0.0,
    }


def ties_comparison(models: Path, work: Path, jobs: int) -> dict:
    """mergekit ``ties`` against graftbuild ``ties`` on the same models and parameters."""
    cfg = work / "mergekit-ties.yml"
    cfg.write_text(
        MERGEKIT_TIES.format(
            models=models, w=TIES["weight"], density=TIES["density"], lam=TIES["lambda"]
        )
    )
    mk = timed("mergekit ties", competitor("mergekit-yaml", str(cfg), str(work / "mk-ties")))
    gb = graftbuild_pipeline(models, work / "ties", "exact", jobs, end_to_end=True, ties=True)
    diff = difference(work / "ties" / "out" / "fused" / "fused", work / "mk-ties", models / "base")
    shutil.rmtree(work / "mk-ties")
    shutil.rmtree(work / "ties")
    return {
        "params": TIES,
        "mergekit": mk.__dict__,
        "graftbuild": {k: v.__dict__ for k, v in gb.items()},
        "difference": diff,
        "ratios_vs_mergekit": {
            "end_to_end_wall": round(gb["end_to_end"].wall_s / mk.wall_s, 3),
            "end_to_end_peak_rss": round(gb["end_to_end"].peak_rss_mb / mk.peak_rss_mb, 3),
            "fuse_only_wall": round(gb["fuse"].wall_s / mk.wall_s, 3),
            "fuse_only_peak_rss": round(gb["fuse"].peak_rss_mb / mk.peak_rss_mb, 3),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", type=Path, help="folder with base/, x/, y/")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--results", type=Path)
    ap.add_argument("--skip-compressed", action="store_true")
    ap.add_argument("--skip-ties", action="store_true")
    ap.add_argument("--only-ties", action="store_true", help="only the ties comparison")
    ap.add_argument("--clean", action="store_true", help="delete --work afterwards")
    args = ap.parse_args()
    models, work = args.models.resolve(), args.work.resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    size = sum(f.stat().st_size for f in (models / "base").glob("*.safetensors"))

    if args.only_ties:
        res = {"model_bytes": size, "ties": ties_comparison(models, work, args.jobs)}
        publish(res, args.results)
        if args.clean:
            shutil.rmtree(work)
        return
    cfg = work / "mergekit.yml"
    cfg.write_text(MERGEKIT.format(models=models, wx=WEIGHTS["x"], wy=WEIGHTS["y"]))
    mk = timed("mergekit task_arithmetic", competitor("mergekit-yaml", str(cfg), str(work / "mk")))
    exact = graftbuild_pipeline(models, work / "exact", "exact", args.jobs, end_to_end=True)
    check = compare(work / "exact" / "out" / "fused" / "fused", work / "mk")
    shutil.rmtree(work / "mk")  # free the disk before the next pipeline
    res: dict = {
        "model_bytes": size,
        "mergekit": mk.__dict__,
        "exact": {k: v.__dict__ for k, v in exact.items()},
        "exact_equals_mergekit": check,
    }
    res["ratios_vs_mergekit"] = {
        "exact_end_to_end_wall": round(exact["end_to_end"].wall_s / mk.wall_s, 3),
        "exact_end_to_end_peak_rss": round(exact["end_to_end"].peak_rss_mb / mk.peak_rss_mb, 3),
        "exact_fuse_only_wall": round(exact["fuse"].wall_s / mk.wall_s, 3),
        "exact_fuse_only_peak_rss": round(exact["fuse"].peak_rss_mb / mk.peak_rss_mb, 3),
    }
    shutil.rmtree(work / "exact")
    if not args.skip_ties:
        res["ties"] = ties_comparison(models, work, args.jobs)
    if not args.skip_compressed:
        comp = graftbuild_pipeline(
            models, work / "compressed", "compressed", args.jobs, end_to_end=False
        )
        res["compressed"] = {k: v.__dict__ for k, v in comp.items()}
        res["ratios_vs_mergekit"] |= {
            "compressed_fuse_only_wall": round(comp["fuse"].wall_s / mk.wall_s, 3),
            "compressed_fuse_only_peak_rss": round(comp["fuse"].peak_rss_mb / mk.peak_rss_mb, 3),
        }
    publish(res, args.results)
    if args.clean:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
