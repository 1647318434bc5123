"""Every mergekit-named method, mergekit 0.1.5 against graftbuild side by side on the same
models: wall time and peak RSS of the merge, one run each, interleaved method by method.

    python benchmarks/make_models.py /tmp/gb-bench/m07 --size 0.7gb
    BENCH_VENV=/work/venvs/mergekit python benchmarks/bench_mergekit_methods.py /tmp/gb-bench/m07 \\
        --work /tmp/gb-bench/mk07 --out benchmarks/results/mergekit_methods_07.json

mergekit runs ``mergekit-yaml CONFIG OUT --random-seed 0 --no-copy-tokenizer`` (CPU, its
defaults). graftbuild imports the same YAML (``graftbuild import mergekit``) and runs ``make``:
its exact packs of x and y are built once first (timed on their own: "packs"), so each
method's ``make`` is its fuse alone, as a user who changes only the merge gets; "end to end"
adds the packs' time. Every output is compared with mergekit's (deterministic methods:
max ‖a − b‖∞/‖b‖∞ per tensor; random ones: the merged delta's density and norm).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import yaml
from common import competitor, graftbuild, publish, timed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import mergekit_oracle as oracle

SUM_FUSE = """[[fuse]]
name = "sum"
packs = ["x", "y"]
strategy = "sum"
weights = { x = 0.6, y = 0.4 }
"""


def configs(models: Path) -> dict[str, dict]:
    base, x, y = (str(models / k) for k in ("base", "x", "y"))
    two = {"models": [{"model": x, "parameters": {"weight": 0.6, "density": 0.5}},
                      {"model": y, "parameters": {"weight": 0.4, "density": 0.5}}],
           "base_model": base, "dtype": "float32"}  # fmt: skip
    plain = {"models": [{"model": x, "parameters": {"weight": 0.6}},
                        {"model": y, "parameters": {"weight": 0.4}}],
             "base_model": base, "dtype": "float32"}  # fmt: skip
    bare = {"models": [{"model": x}, {"model": y}], "base_model": base, "dtype": "float32"}
    one = {"models": [{"model": base}, {"model": x}], "base_model": base, "dtype": "float32"}
    return {
        "linear": {"models": plain["models"], "merge_method": "linear", "dtype": "float32"},
        "task_arithmetic": plain | {"merge_method": "task_arithmetic"},
        "ties": two | {"merge_method": "ties"},
        "dare_linear": two | {"merge_method": "dare_linear"},
        "dare_ties": two | {"merge_method": "dare_ties"},
        "breadcrumbs": two | {"merge_method": "breadcrumbs"},
        "breadcrumbs_ties": two | {"merge_method": "breadcrumbs_ties"},
        "della": two | {"merge_method": "della", "parameters": {"epsilon": 0.1}},
        "della_linear": two | {"merge_method": "della_linear", "parameters": {"epsilon": 0.1}},
        "slerp": one | {"merge_method": "slerp", "parameters": {"t": 0.5}},
        "nuslerp": plain | {"merge_method": "nuslerp"},
        "multislerp": plain | {"merge_method": "multislerp"},
        "karcher": {
            "models": [{"model": x}, {"model": y}],
            "merge_method": "karcher",
            "dtype": "float32",
        },
        "sce": bare | {"merge_method": "sce", "parameters": {"select_topk": 0.5}},
        "model_stock": bare | {"merge_method": "model_stock"},
        "nearswap": one | {"merge_method": "nearswap", "parameters": {"t": 0.001}},
        "arcee_fusion": one | {"merge_method": "arcee_fusion"},
        "passthrough": {
            "models": [{"model": x}],
            "merge_method": "passthrough",
            "dtype": "float32",
        },
    }


def table(res: dict) -> str:
    """The results as the markdown table of docs/BENCHMARKS.md (peak RSS also against the
    graftbuild `sum` fuse of the same packs, the streaming reference)."""
    ref = res.get("graftbuild_sum_fuse", {}).get("peak_rss_mb")
    head = ["method", "mergekit s", "graftbuild fuse s", "ratio (fuse)", "ratio (packs + fuse)",
            "mergekit peak RSS MB", "graftbuild peak RSS MB", "RSS ratio"]  # fmt: skip
    head += ["graftbuild RSS − sum fuse's MB"] if ref else []
    rows = ["| " + " | ".join([*head, "agreement"]) + " |", "|---" * (len(head) + 1) + "|"]
    for m, v in res["methods"].items():
        a = v["agreement"]
        if "max_rel_diff" in a:
            ag = f"max rel diff {a['max_rel_diff']:.1e}"
        else:
            ag = f"density {a['density_ours']:.4f} vs {a['density_mergekit']:.4f}, "
            ag += f"norm {a['norm_rel'] * 100:.2f}% apart"
        ag += "" if v["agrees"] else " (FAILS)"
        mk, gb = v["mergekit"], v["graftbuild_fuse"]
        cells = [f"`{m}`", f"{mk['wall_s']:.1f}", f"{gb['wall_s']:.1f}",
                 f"{v['wall_ratio_fuse_vs_mergekit']:.2f}x",
                 f"{v['wall_ratio_end_to_end_vs_mergekit']:.2f}x", f"{mk['peak_rss_mb']:.0f}",
                 f"{gb['peak_rss_mb']:.0f}", f"{v['rss_ratio_vs_mergekit']:.2f}x"]  # fmt: skip
        cells += [f"{gb['peak_rss_mb'] - ref:+.0f}"] if ref else []
        rows.append("| " + " | ".join([*cells, ag]) + " |")
    p = res["packs"]
    rows.append(
        f"\npacks x, y (exact, once): {p['wall_s']:.1f} s, peak RSS {p['peak_rss_mb']:.0f} MB"
    )
    if ref:
        r = res["graftbuild_sum_fuse"]
        rows.append(
            f"graftbuild `sum` fuse of the same packs: {r['wall_s']:.1f} s, peak RSS {ref:.0f} MB"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", type=Path)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--methods", nargs="*", help="these methods, in this order (default: all)")
    ap.add_argument("--out", type=Path)
    ap.add_argument(
        "--resume", action="store_true", help="keep the methods already in --out, run the rest"
    )
    args = ap.parse_args()
    work: Path = args.work
    shutil.rmtree(work, ignore_errors=True)
    (work / "cfg").mkdir(parents=True)
    cfgs = configs(args.models)
    if args.methods:
        unknown = sorted(set(args.methods) - set(cfgs))
        if unknown:
            raise SystemExit(f"--methods: unknown {unknown}; expected some of {sorted(cfgs)}")
        cfgs = {k: cfgs[k] for k in args.methods}
    done: dict = {}
    earlier: list = []  # the sessions a resumed run continues (their packs and sum reference)
    if args.resume and args.out and args.out.exists():
        prev = json.loads(args.out.read_text())
        done = prev["methods"]
        keep = ("packs", "graftbuild_sum_fuse", "load_at_start")
        earlier = [*prev.get("earlier", []), {k: prev[k] for k in keep if k in prev}]
        listed = {m for e in earlier[:-1] for m in e.get("methods", [])}
        earlier[-1]["methods"] = [m for m in done if m not in listed]
        cfgs = {k: v for k, v in cfgs.items() if k not in done}
    load_at_start = os.getloadavg()
    recipes = {}
    # "ties" is always imported: its recipe's packs (x and y against base) are the ones every
    # base-model method shares, built once below.
    for name, cfg in (cfgs | {"ties": configs(args.models)["ties"]}).items():
        path = work / "cfg" / f"{name}.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        recipe = work / "gb" / f"{name}.toml"
        timed(f"import {name}", graftbuild("import", "mergekit", str(path), "-o", str(recipe),
                                          "--seed", "0"))  # fmt: skip
        text = recipe.read_text().replace("[project]\n", f'[project]\ncache = "{work}/cache"\n')
        recipe.write_text(text)
        recipes[name] = (path, recipe)
    # The packs of x and y, once (every recipe's sources are the same exact packs).
    packs = timed("graftbuild packs x, y (exact, once)", graftbuild(
        "make", str(recipes["ties"][1]), "pack:x", "pack:y", "-q"))  # fmt: skip
    objects = work / "cache" / "objects"
    kept = set(objects.glob("*/*"))  # the packs; each fused model is dropped after its check
    # The memory reference: graftbuild's own `sum` fuse of the same packs (one tensor at a time).
    ties_toml = (work / "gb" / "ties.toml").read_text()
    sum_recipe = work / "gb" / "sum.toml"
    sum_recipe.write_text(ties_toml.split("[[fuse]]")[0] + SUM_FUSE)
    ref = timed("graftbuild sum (fuse, reference)", graftbuild("make", str(sum_recipe), "-q"))
    if "ties" not in cfgs:
        del recipes["ties"]
    res: dict = {
        "models": str(args.models),
        "packs": packs.__dict__,
        "graftbuild_sum_fuse": ref.__dict__,
        "load_at_start": load_at_start,
        **({"earlier": earlier} if earlier else {}),
        "methods": done,
    }
    for name, (cfg, recipe) in recipes.items():
        mk_out = work / "mk" / name
        mk = timed(f"mergekit {name}", competitor(
            "mergekit-yaml", str(cfg), str(mk_out), "--random-seed", "0", "--no-copy-tokenizer"
        ))  # fmt: skip
        gb = timed(f"graftbuild {name} (fuse)", graftbuild("make", str(recipe), "-q"))
        ours = work / "gb" / "out" / "fused" / name
        method = cfg.stem
        check = oracle.check(method, ours, mk_out, args.models / "base")
        res["methods"][name] = {
            "mergekit": mk.__dict__,
            "graftbuild_fuse": gb.__dict__,
            "wall_ratio_fuse_vs_mergekit": round(gb.wall_s / mk.wall_s, 3),
            "wall_ratio_end_to_end_vs_mergekit": round((gb.wall_s + packs.wall_s) / mk.wall_s, 3),
            "rss_ratio_vs_mergekit": round(gb.peak_rss_mb / mk.peak_rss_mb, 3),
            "agreement": check,
            "agrees": oracle.passes(method, check),
            "load_after": os.getloadavg(),  # 1, 5, 15 min load averages (2 cores)
        }
        shutil.rmtree(mk_out, ignore_errors=True)
        shutil.rmtree(work / "gb" / "out" / "fused" / name, ignore_errors=True)
        for obj in set(objects.glob("*/*")) - kept:  # 3 GB each: the disk would not hold 18
            shutil.rmtree(obj)
        if args.out:  # after every method, so a run cut short keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(res, indent=1) + "\n")
    publish(res, args.out)
    print(table(res))


if __name__ == "__main__":
    main()
