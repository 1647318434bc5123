"""Model cards: README.md with Hugging Face YAML front matter and a provenance section.

Pure text rendering from data the release step gathered from its inputs; no clock, no host
names, no versions that are not part of the release node's key, so equal inputs give an equal
card.
"""

from __future__ import annotations

import re
from typing import Any

from graftbuild.release.gates import GateResult

FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.S)


def read_front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a model card ({} when it has none or it is not a mapping)."""
    import yaml

    m = FRONT_MATTER.match(text)
    if not m:
        return {}
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def codec_label(codec: str, params: dict[str, Any]) -> str:
    """The codec's own label of its parameters (``mixed(0.01@8b, ...)``, ``prune(keep=0.1)``)."""
    from graftbuild.compress.codecs import get_codec

    return get_codec(codec).label(params)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


REPORT = "report.html"
"""The build report's file name the card links (``graftbuild report``; sections: html.py)."""


def _cell(v: dict[str, Any]) -> str:
    """One eval table cell: ``loss (perplexity)``, or ``MRR / recall@1`` for retrieval."""
    if "mrr" in v:
        return f"{v['mrr']:.4f} / {v['recall@1']:.4f}"
    return f"{v['loss']:.4f} ({v['perplexity']:.2f})"


def render(info: dict[str, Any]) -> str:
    """The README.md text for a release (``info`` is built by steps/release.py)."""
    import yaml

    auto = info.get("auto_class", "AutoModelForCausalLM")
    st = info.get("sentence_transformers", False)
    library = "sentence-transformers" if st else "transformers"
    front: dict[str, Any] = {"library_name": library, "tags": info["tags"]}
    if info.get("base_model"):
        front["base_model"] = info["base_model"]
    if info.get("license"):
        front["license"] = info["license"]
    out = ["---", yaml.safe_dump(front, sort_keys=True, allow_unicode=True).rstrip(), "---", ""]

    fuse = info["fuse"]
    packs = info["packs"]
    out += [
        f"# {info['project']} — {info['release']}",
        "",
        f"A base model with {len(packs)} SkillPack{'s' if len(packs) != 1 else ''} grafted in "
        f"(GraftLLM, arXiv 2505.18502), fused with the `{fuse['strategy']}` strategy and built by "
        f"graftbuild from the recipe of project `{info['project']}` version "
        f"`{info['version']}`. It loads with `transformers.{auto}.from_pretrained`"
        + (", and as a whole with `sentence_transformers.SentenceTransformer`." if st else "."),
        "",
        "## Provenance",
        "",
        f"- base: {info['base_desc']}, content hash `{info['base_hash']}`",
        f"- fused weights: node `fuse:{fuse['name']}`, content hash `{info['model_hash']}`",
        f"- fusion: `{fuse['strategy']}` in the order {', '.join(f'`{p}`' for p in fuse['packs'])}"
        + (f", options `{fuse['options']}`" if fuse["options"] else ""),
        "- every file's size, SHA-256 and xxh3-128: `graftbuild-manifest.json`; rebuild and "
        "check with `graftbuild make` and `graftbuild verify` on the recipe and its lockfile",
        "",
        "### SkillPacks",
        "",
    ]
    rows = []
    for p in packs:
        ratio = p["delta_bytes"] / p["pack_bytes"] if p["pack_bytes"] else 0.0
        codecs = "; ".join(
            f"{role}: {label} ×{n}" for role, (label, n) in sorted(p["codecs"].items())
        )
        rows.append(
            [
                f"`{p['name']}`",
                f"{p['weight']:g}",
                f"`{p['profile']}`",
                human_bytes(p["pack_bytes"]),
                f"1/{ratio:.1f}" if ratio else "-",
                codecs,
                f"`{p['hash']}`",
            ]
        )
    out += _table(
        ["pack", "weight", "profile", "size", "of fp16 delta", "codecs by role", "hash"], rows
    )
    for p in packs:
        target = p.get("target")
        if target:  # how a quality target chose the pack's size
            tried = ", ".join(
                f"{e['budget']:.4g} → {e['keep']:.1%}"
                for e in sorted(target["evaluations"], key=lambda e: e["budget"])
            )
            out += [
                "",
                f"`{p['name']}` was sized by a quality target: keep ≥ {target['keep']:.0%} of the "
                f"fine-tune's improvement on held-out data; budget {target['budget']:.4g} chosen "
                f"after these evaluations (budget → share kept): {tried}.",
            ]

    for ev in info["evals"]:
        metrics = ev["metrics"]
        models = [m for m in ev.get("models", metrics) if m in metrics]  # the recipe's order
        datasets = sorted({d for m in metrics.values() for d in m})
        retrieval = any("mrr" in v for m in metrics.values() for v in m.values())
        losses = any("loss" in v for m in metrics.values() for v in m.values())
        what = ["held-out loss (perplexity)"] * losses + ["retrieval MRR / recall@1"] * retrieval
        out += ["", f"### Evaluation `{ev['name']}`: {'; '.join(what)}", ""]
        rows = [
            [f"`{m}`"] + [_cell(metrics[m][d]) if d in metrics[m] else "" for d in datasets]
            for m in models
        ]
        out += _table(["model", *datasets], rows)
        out += ["", f"Charts per dataset: [build report]({REPORT}#eval-{ev['name']})."]
        gates: list[GateResult] = ev["gates"]
        if gates:
            out += ["", "Release gates:", ""]
            out += _table(
                ["gate", "result"],
                [[g.describe(), "pass" if g.passed else "FAIL"] for g in gates],
            )
    out += [
        "",
        "## Build report",
        "",
        f"The numbers above, drawn, with every pack's plot per layer and role, the build graph "
        f"and the environments that built each node: [{REPORT}]({REPORT}) "
        f"([evaluations]({REPORT}#evals), [packs]({REPORT}#packs), [gates]({REPORT}#gates), "
        f"[environments]({REPORT}#environments)), written beside this card by "
        f"`graftbuild report RECIPE -o {REPORT}`.",
    ]
    return "\n".join(out) + "\n"
