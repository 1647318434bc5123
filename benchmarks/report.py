"""Print the markdown tables of docs/BENCHMARKS.md from benchmarks/results/*.json."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(name: str) -> dict | None:
    p = RESULTS / name
    return json.loads(p.read_text()) if p.is_file() else None


def verdict(value: float, target: float, below: bool = True) -> str:
    ok = value <= target if below else value >= target
    return f"{'met' if ok else 'NOT met'} (target {'≤' if below else '≥'} {target})"


def noop(r: dict) -> None:
    n, h = r["noop"], r["hashing"]
    reps = len(n["all_s"]["dvc"])
    print(f"| no-op command (median of {reps}) | wall s | vs `dvc repro` |")
    print("|---|---|---|")
    rows = [
        ("`dvc repro`", n["dvc"]),
        ("`graftbuild make` (fast path)", n["make"]),
        ("`graftbuild plan` (fast path)", n["plan"]),
        ("`graftbuild --debug make` (full planner, no fast path)", n["make_planner"]),
        ("`python -c pass`", n["python"]),
    ]
    for label, v in rows:
        print(f"| {label} | {v:.3f} | {v / n['dvc']:.3f}x |")
    print()
    print(
        f"no-op make vs dvc: {n['ratio_make_vs_dvc']:.3f}x, {verdict(n['ratio_make_vs_dvc'], 0.1)}"
    )
    print()
    gb = h["bytes"] / 1e9
    print(f"| hashing {gb:.2f} GB | `cat > /dev/null` GB/s | graftbuild hash GB/s | ratio |")
    print("|---|---|---|---|")
    for kind in ("warm", "cold"):
        c, g, ratio = h[f"cat_{kind}_gbps"], h[f"hash_{kind}_gbps"], h[f"ratio_{kind}"]
        v = verdict(ratio, 0.8, below=False)
        print(f"| {kind} page cache | {c:.2f} | {g:.2f} | {ratio:.2f}x, {v} |")
    print()


def fuse(name: str, r: dict) -> None:
    mk = r["mergekit"]
    print(f"#### {name}: {r['model_bytes'] / 1e9:.2f} GB per model (float32)")
    print()
    print("| run | wall s | peak RSS MB | wall vs mergekit | RSS vs mergekit |")
    print("|---|---|---|---|---|")
    rows = [("mergekit `task_arithmetic`", mk)]
    for profile in ("exact", "compressed"):
        rows += [(v["label"], v) for v in (r.get(profile) or {}).values()]
    for label, v in rows:
        print(
            f"| {label} | {v['wall_s']:.1f} | {v['peak_rss_mb']:.0f} | "
            f"{v['wall_s'] / mk['wall_s']:.3f}x | {v['peak_rss_mb'] / mk['peak_rss_mb']:.3f}x |"
        )
    c = r["exact_equals_mergekit"]
    print()
    print(
        f"exact `sum` vs mergekit `task_arithmetic`: {c['tensors']} tensors, max |diff| "
        f"{c['max_abs_diff']:.3g} (max relative {c['max_rel_diff']:.3g}): equal to float tolerance."
    )
    print()
    if "ties" in r:
        ties(r["ties"])


def ties(t: dict) -> None:
    mk = t["mergekit"]
    p = t["params"]
    print(f"`ties`, density {p['density']}, weights {p['weight']}, scale/lambda {p['lambda']}:")
    print()
    print("| run | wall s | peak RSS MB | wall vs mergekit | RSS vs mergekit |")
    print("|---|---|---|---|---|")
    rows = [("mergekit `ties`", mk)] + [(v["label"], v) for v in t["graftbuild"].values()]
    for label, v in rows:
        print(
            f"| {label} | {v['wall_s']:.1f} | {v['peak_rss_mb']:.0f} | "
            f"{v['wall_s'] / mk['wall_s']:.3f}x | {v['peak_rss_mb'] / mk['peak_rss_mb']:.3f}x |"
        )
    d = t["difference"]
    print()
    print(
        f"graftbuild `ties` vs mergekit `ties`: max |diff| {d['max_abs_diff']:.3g}, "
        f"{d['fraction_differing']:.2e} of the entries differ by more than 1e-6, "
        f"‖difference‖ / ‖mergekit's merged delta‖ = {d['relative_diff_of_merged_delta']:.2e}."
    )
    print()


def rounds(results: dict[str, dict]) -> None:
    """The interleaved rounds (bench_fuse_rounds.py), one row per model size and run."""
    print("| model | run | median s | + sync s | vs mergekit | + sync vs mergekit + sync |")
    print("|---|---|---|---|---|---|")
    labels = {
        "mergekit": "mergekit `task_arithmetic`",
        "fuse": "graftbuild fuse alone",
        "fuse_fsync": "graftbuild fuse alone, `--fsync`",
        "end_to_end": "graftbuild cold make (pack, pack, fuse)",
        "end_to_end_fsync": "graftbuild cold make, `--fsync`",
    }
    for size, r in results.items():
        m = r["median_wall_s"]
        for key, label in labels.items():
            if key not in m:
                continue
            plus = m[f"{key}_plus_sync"]
            print(
                f"| {size} | {label} | {m[key]:.1f} | {plus:.1f} | "
                f"{m[key] / m['mergekit']:.3f}x | {plus / m['mergekit_plus_sync']:.3f}x |"
            )
    print()


def main() -> None:
    r = load("noop_2gb.json")
    if r:
        noop(r)
    for name in ("fuse_0.7gb.json", "fuse_3gb.json"):
        r = load(name)
        if r:
            fuse(name.removesuffix(".json"), r)
    found = {
        size: r for size in ("0.7gb", "3gb") if (r := load(f"fuse_rounds_{size}.json")) is not None
    }
    if found:
        rounds(found)
    small, big = load("fuse_0.7gb.json"), load("fuse_3gb.json")
    if small and big:
        print("| pack build peak RSS MB | 0.7 GB | 3 GB | growth |")
        print("|---|---|---|---|")
        for profile in ("exact", "compressed"):
            if profile in small and profile in big:
                a, b = small[profile]["packs"]["peak_rss_mb"], big[profile]["packs"]["peak_rss_mb"]
                g = b / a - 1
                v = "met" if g < 0.1 else "NOT met"
                print(f"| {profile} | {a:.0f} | {b:.0f} | {g:+.1%} ({v}, target < +10%) |")


if __name__ == "__main__":
    main()
