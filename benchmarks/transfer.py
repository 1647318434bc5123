"""Transfer from a heterogeneous teacher: what SFT and DPO do, before and after packing.

Builds ``recipes/transfer.toml`` (a GPT-2 teacher with a character-level tokenizer teaches the
quickstart's Llama base to write ISO dates out) in a scratch copy with a fresh cache, twice:

* ``sft+dpo``: the recipe as it is (teach -> sft -> dpo -> pack -> fuse);
* ``sft``: the same without ``dpo`` (teach and sft are reused from the first build: same keys).

For each model it reports the eval node's held-out losses (date skill, and the base's own
``general`` domain) and the greedy exact-match rate on the 200 held-out date prompts (the
answer after the prompt, up to eos, must equal the reference). Run::

    python benchmarks/transfer.py [--work DIR] [--keep]

Prints a Markdown table (docs/BENCHMARKS.md, "Transfer from a heterogeneous teacher") and
writes benchmarks/results/transfer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "transfer.json"
HELDOUT = "transfer/data/skill.heldout.txt"


def make(recipe: Path, cache: Path) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "graftbuild", "make", str(recipe), "--cache", str(cache), "-q"],
        check=True,
        cwd=REPO,
    )
    return time.perf_counter() - start


def exact_match(model_dir: Path, heldout: Path) -> float:
    """Greedy answers to the held-out prompts, compared with the references."""
    from graftbuild.generation import generate
    from graftbuild.modeling import load_causal_lm, load_tokenizer

    pairs = []
    for line in heldout.read_text().splitlines():
        cut = line.index(":") + 1
        pairs.append((line[:cut], line[cut:]))
    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir)
    gen = {
        "max_new_tokens": 16,
        "temperature": 0.0,
        "top_p": 1.0,
        "samples": 1,
        "seed": 0,
        "batch_size": 50,
    }
    answers = generate(model, tok, [p for p, _ in pairs], gen, "cpu", lambda n: None)
    hits = sum(a[0].split("\n")[0].rstrip() == ref for a, (_, ref) in zip(answers, pairs))
    return hits / len(pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/graftbuild-transfer-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = ap.parse_args()

    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    (work / "recipes").mkdir(parents=True)
    for name in ("quickstart", "transfer"):
        shutil.copytree(REPO / "recipes" / name, work / "recipes" / name)
    text = (REPO / "recipes" / "transfer.toml").read_text()
    full = work / "recipes" / "transfer.toml"
    full.write_text(text)
    sft_only = work / "recipes" / "transfer_sft.toml"
    sft_text = re.sub(r"(?m)^dpo = .*\n", "", text).replace('"dpo:dates", ', "")
    sft_only.write_text(sft_text.replace('out = "../out/transfer"', 'out = "../out/transfer_sft"'))
    cache = work / "cache"

    times = {"sft+dpo": make(full, cache), "sft": make(sft_only, cache)}
    out = work / "out"
    metrics = json.loads((out / "transfer" / "evals" / "transfer" / "metrics.json").read_text())
    metrics_sft = json.loads(
        (out / "transfer_sft" / "evals" / "transfer" / "metrics.json").read_text()
    )
    heldout = work / "recipes" / HELDOUT
    rows = {
        "base": (metrics["base"], out / "transfer" / "base"),
        "sft:dates (θ*, no DPO)": (metrics["sft:dates"], out / "transfer" / "sources" / "dates" / "sft"),
        "dpo:dates (θ*, SFT + DPO)": (
            metrics["dpo:dates"],
            out / "transfer" / "sources" / "dates" / "dpo",
        ),
        "fused, SFT only": (metrics_sft["fuse:release"], out / "transfer_sft" / "fused" / "release"),
        "fused, SFT + DPO": (metrics["fuse:release"], out / "transfer" / "fused" / "release"),
    }
    table = {}
    for label, (m, folder) in rows.items():
        table[label] = {
            "dates_loss": m["dates"]["loss"],
            "general_loss": m["general"]["loss"],
            "exact_match": exact_match(folder, heldout),
        }
    result = {"build_seconds": times, "models": table}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")

    base = table["base"]
    print("| model | dates loss | general loss (Δ vs base) | exact match, 200 held-out dates |")
    print("|---|---|---|---|")
    for label, r in table.items():
        delta = r["general_loss"] - base["general_loss"]
        print(
            f"| {label} | {r['dates_loss']:.3f} | {r['general_loss']:.3f} ({delta:+.3f}) "
            f"| {r['exact_match']:.1%} |"
        )
    print(f"\nbuild: {times['sft+dpo']:.0f} s (everything), then {times['sft']:.0f} s (SFT-only)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
