"""Transfer from a heterogeneous teacher: what SFT and DPO do, before and after packing.

Builds ``recipes/transfer.toml`` (a GPT-2 teacher with a character-level tokenizer teaches the
quickstart's Llama base to write ISO dates out) in a scratch copy with a fresh cache, three
times (later builds reuse every node whose key is unchanged: base, teacher, teach, sft):

* ``sft_dpo``: the recipe as it is (teach -> sft 200 steps -> dpo 100 steps -> pack -> fuse);
* ``sft``: the same without ``dpo``;
* ``sft_more``: SFT for 300 steps, no DPO: as many optimizer steps as ``sft_dpo``, the control
  that tells DPO's effect from that of more training.

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
HELDOUT = "transfer/data/skill.heldout.txt"  # exact match reads the plain-text pairs


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
    from graftbuild.weights.generation import generate
    from graftbuild.weights.modeling import load_causal_lm, load_tokenizer
    from graftbuild.weights.placement import Placement

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
    answers = generate(model, tok, [p for p, _ in pairs], gen, Placement(), lambda n: None)
    hits = sum(
        a[0].split("\n")[0].rstrip() == ref for a, (_, ref) in zip(answers, pairs, strict=True)
    )
    return hits / len(pairs)


def routed_rows(bundle: Path, heldout: Path, general: Path) -> dict[str, float]:
    """The routed bundle: where the router sends each held-out line, the mean per-line loss of
    the base domain as routed (against the base alone), and exact match with routing."""
    import torch

    from graftbuild.runtime import GraftedModel

    g = GraftedModel.from_pretrained(bundle)
    lines = [ln for ln in general.read_text().splitlines() if ln.strip()]
    prompts = [ln[: ln.index(":") + 1] for ln in heldout.read_text().splitlines()]
    refs = [ln[ln.index(":") + 1 :] for ln in heldout.read_text().splitlines()]
    general_routes = g.route(lines)
    date_routes = g.route(prompts)

    def line_loss(packs: list[list[str]]) -> float:
        total, count = 0.0, 0
        eos = g.tokenizer.eos_token_id
        for line, chosen in zip(lines, packs, strict=True):
            ids = torch.tensor([g.tokenizer(line)["input_ids"] + [eos]])
            with g.using(chosen), torch.no_grad():
                total += g.model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
        return total / count

    answers = g.generate(prompts, max_new_tokens=16, packs=date_routes)
    hits = sum(a.split("\n")[0].rstrip() == r for a, r in zip(answers, refs, strict=True))
    return {
        "general_to_base": sum(r == [] for r in general_routes) / len(lines),
        "dates_to_pack": sum(r == ["dates"] for r in date_routes) / len(prompts),
        "general_line_loss_routed": line_loss(general_routes),
        "general_line_loss_base": line_loss([[] for _ in lines]),
        "exact_match": hits / len(prompts),
    }


def variant(text: str, name: str, sft_steps: int | None, dpo: bool) -> str:
    """The recipe with its out folder renamed, optionally without DPO or with more SFT steps."""
    if not dpo:
        text = re.sub(r"(?m)^dpo = .*\n", "", text).replace('"dpo:dates", ', "")
    if sft_steps is not None:
        text = re.sub(r"sft = \{ steps = \d+", f"sft = {{ steps = {sft_steps}", text)
    return text.replace('out = "../out/transfer"', f'out = "../out/{name}"')


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
    variants = {  # name -> (sft steps, dpo)
        "sft_dpo": (None, True),  # the recipe as it is
        "sft": (None, False),
        "sft_more": (300, False),  # as many optimizer steps as SFT 200 + DPO 100
    }
    cache, out, times, metrics = work / "cache", work / "out", {}, {}
    for name, (steps, dpo) in variants.items():
        recipe = work / "recipes" / f"{name}.toml"
        recipe.write_text(variant(text, name, steps, dpo))
        times[name] = make(recipe, cache)
        metrics[name] = json.loads((out / name / "evals" / "transfer" / "metrics.json").read_text())

    heldout = work / "recipes" / HELDOUT
    dates = out / "sft_dpo" / "sources" / "dates"
    rows = {
        "base": (metrics["sft"]["base"], out / "sft" / "base"),
        "θ* after SFT 200 steps (sft:dates)": (metrics["sft"]["sft:dates"], dates / "sft"),
        "θ* after SFT 200 + DPO 100 (dpo:dates)": (metrics["sft_dpo"]["dpo:dates"], dates / "dpo"),
        "θ* after SFT 300 steps (control)": (
            metrics["sft_more"]["sft:dates"],
            out / "sft_more" / "sources" / "dates",
        ),
        "grafted: base ⊕ pack of SFT 200": (
            metrics["sft"]["fuse:release"],
            out / "sft" / "fused" / "release",
        ),
        "grafted: base ⊕ pack of SFT 200 + DPO 100": (
            metrics["sft_dpo"]["fuse:release"],
            out / "sft_dpo" / "fused" / "release",
        ),
        "grafted: base ⊕ pack of SFT 300": (
            metrics["sft_more"]["fuse:release"],
            out / "sft_more" / "fused" / "release",
        ),
    }
    table = {}
    for label, (m, folder) in rows.items():
        table[label] = {
            "dates_loss": m["dates"]["loss"],
            "general_loss": m["general"]["loss"],
            "exact_match": exact_match(folder, heldout),
        }
    routed = routed_rows(
        out / "sft_dpo" / "fused" / "routed",
        heldout,
        work / "recipes" / "quickstart" / "data" / "general.heldout.txt",
    )
    packs = {
        name: sum(p.stat().st_size for p in (out / name / "packs" / "dates").iterdir())
        for name in variants
    }
    result = {"build_seconds": times, "pack_bytes": packs, "models": table, "routed": routed}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")

    base = table["base"]
    print("| model | dates loss (response only) | general loss (Δ vs base) | exact match |")
    print("|---|---|---|---|")
    for label, r in table.items():
        delta = r["general_loss"] - base["general_loss"]
        print(
            f"| {label} | {r['dates_loss']:.3f} | {r['general_loss']:.3f} ({delta:+.3f}) "
            f"| {r['exact_match']:.1%} |"
        )
    r = routed
    print(
        f"\nrouted bundle (SFT + DPO pack): general lines to the base alone "
        f"{r['general_to_base']:.1%}, date prompts to the dates pack {r['dates_to_pack']:.1%}; "
        f"general per-line loss {r['general_line_loss_routed']:.3f} "
        f"(base alone {r['general_line_loss_base']:.3f}); exact match {r['exact_match']:.1%}"
    )
    print("\nbuild seconds:", {k: round(v) for k, v in times.items()}, "pack bytes:", packs)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
