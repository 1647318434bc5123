"""Fusion side by side: routed bundles against sum, TIES and DARE on three skills, plus a chain.

Builds everything with graftbuild itself (two recipes in a scratch folder):

1. ``pre``: the quickstart base (a 128-hidden Llama, random init) fine-tuned on ``general``
   English; that model is the *base* below, so "the base domain" means something.
2. ``main``: sources fine-tuned from that base on ``arith``, ``code`` and ``lang``, packed with
   the default (GraftLLM) profile; one single-pack graft per skill (``sum`` of one pack); ``sum``,
   ``ties`` and ``dare`` of all three; a ``routed`` bundle with base prompts; and a continual chain
   arith -> code -> lang (``parent``) built in two steps to check earlier packs keep their bytes.

Loss: mean next-token loss per held-out line (each line its own sequence, ending in eos), so the
routed model can route each line. Run: ``python benchmarks/fusion.py [--steps N] [--lines N]``;
prints a Markdown table (pasted into docs/BENCHMARKS.md, section "Fusion").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
QS = REPO / "recipes" / "quickstart"
SKILLS = ["arith", "code", "lang"]
DOMAINS = [*SKILLS, "general"]

PRE = """
[project]
name = "fusion-pre"
cache = "cache"
[base]
config = "{qs}/base_config.json"
tokenizer = "{qs}/tokenizer"
[sources.general]
finetune = {{ data = "{qs}/data/general.train.txt", steps = {steps}, lr = 3e-3, batch_size = 16 }}
"""

MAIN = """
[project]
name = "fusion"
cache = "cache"
[base]
path = "out/sources/general"
{sources}
[[fuse]]
name = "sum"
packs = ["arith", "code", "lang"]
strategy = "sum"
[[fuse]]
name = "ties"
packs = ["arith", "code", "lang"]
strategy = "ties"
options = {{ density = 0.3, rule = "graftbuild" }}  # the rule these numbers were measured with
[[fuse]]
name = "dare"
packs = ["arith", "code", "lang"]
strategy = "dare"
options = {{ drop = 0.7 }}
[[fuse]]
name = "routed"
packs = ["arith", "code", "lang"]
strategy = "routed"
options = {{ base_prompts = "{qs}/data/general.train.txt" }}
{singles}
{chain_fuse}
"""


LR = 2e-3


def source(name: str, data: str, steps: int, parent: str | None = None) -> str:
    p = f'parent = "{parent}"\n' if parent else ""
    return (
        f'[sources.{name}]\n{p}finetune = {{ data = "{QS}/data/{data}.train.txt", '
        f"steps = {steps}, lr = {LR}, batch_size = 16 }}\n"
    )


def main_recipe(steps: int, chain: list[str]) -> str:
    sources = "".join(source(s, s, steps) for s in SKILLS)
    prev = None
    for s in chain:
        sources += source(f"chain_{s}", s, steps, prev)
        prev = f"chain_{s}"
    singles = "".join(
        f'[[fuse]]\nname = "single_{s}"\npacks = ["{s}"]\nstrategy = "sum"\n' for s in SKILLS
    )
    chain_fuse = ""
    if chain:
        packs = json.dumps([f"chain_{s}" for s in chain])
        prompts = ", ".join(f'chain_{s} = "{QS}/data/{s}.train.txt"' for s in chain)
        chain_fuse = (
            f'[[fuse]]\nname = "chain"\npacks = {packs}\nstrategy = "routed"\n'
            f"options = {{ prompts = {{ {prompts} }}, "
            f'base_prompts = "{QS}/data/general.train.txt" }}\n'
        )
    return MAIN.format(qs=QS, sources=sources, singles=singles, chain_fuse=chain_fuse)


def line_chunks(tok, lines: list[str]):
    """One token sequence per line (plus eos)."""
    return [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in lines]


def seq_loss(model, seqs) -> tuple[float, int]:
    """Summed next-token loss and token count over sequences."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for ids in seqs:
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += len(ids) - 1
    return total, count


def main() -> None:
    global LR
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lines", type=int, default=100)
    ap.add_argument("--work", type=Path, default=Path("/tmp/graftbuild-fusion-bench"))
    ap.add_argument("--lr", type=float, default=LR, help="Skill finetune learning rate.")
    ap.add_argument("--reuse", action="store_true", help="Keep the work folder's cache.")
    args = ap.parse_args()
    LR = args.lr
    sys.path.insert(0, str(REPO))
    import torch

    from graftbuild.build.engine import Engine, cache_dir
    from graftbuild.cache.store import Store
    from graftbuild.recipe import load_recipe
    from graftbuild.runtime import GraftedModel
    from graftbuild.weights.modeling import load_causal_lm, load_tokenizer

    torch.set_num_threads(2)
    work = args.work
    if not args.reuse:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)

    def build(text: str, name: str):
        path = work / name
        path.write_text(text)
        r = load_recipe(path)
        return Engine(r, Store(cache_dir(r))).make()

    t0 = time.time()
    build(PRE.format(qs=QS, steps=args.steps), "pre.toml")
    # The chain in two steps: arith -> code first, lang added later.
    first = build(main_recipe(args.steps, ["arith", "code"]), "main.toml")
    before = {
        n: (first.node(f"pack:{n}").output / "skillpack.safetensors").read_bytes()
        for n in ("chain_arith", "chain_code")
    }
    res = build(main_recipe(args.steps, ["arith", "code", "lang"]), "main.toml")
    rebuilt = [n for n in ("pack:chain_arith", "pack:chain_code") if n in res.built]
    same_bytes = all(
        (res.node(f"pack:{n}").output / "skillpack.safetensors").read_bytes() == b
        for n, b in before.items()
    )
    build_s = time.time() - t0

    tok = load_tokenizer(work / "out" / "sources" / "general")
    heldout = {
        d: (QS / "data" / f"{d}.heldout.txt").read_text().splitlines()[: args.lines]
        for d in DOMAINS
    }
    seqs = {d: line_chunks(tok, heldout[d]) for d in DOMAINS}

    def losses(folder: Path) -> dict[str, float]:
        model = load_causal_lm(folder).eval()
        out = {}
        for d in DOMAINS:
            s, c = seq_loss(model, seqs[d])
            out[d] = s / c
        return out

    table: dict[str, dict[str, float]] = {}
    table["base (general)"] = losses(work / "out" / "sources" / "general")
    for s in SKILLS:
        table[f"source {s} (full finetune)"] = losses(res.node(f"source:{s}").output)
    for s in SKILLS:
        table[f"single-pack graft {s}"] = losses(res.node(f"fuse:single_{s}").output)
    for strat in ("sum", "ties", "dare"):
        table[strat] = losses(res.node(f"fuse:{strat}").output)

    def routed_losses(bundle: Path) -> tuple[dict[str, float], dict[str, float], float]:
        g = GraftedModel.from_pretrained(bundle)
        out, acc = {}, {}
        for d in DOMAINS:
            routes = g.route(heldout[d])
            want = [] if d == "general" else [p for p in g.packs if p.endswith(d)]
            acc[d] = sum(r == want for r in routes) / len(routes)
            total, count = 0.0, 0
            for i, r in enumerate(routes):
                g.activate(r)
                s_, c_ = seq_loss(g.model, [seqs[d][i]])
                total, count = total + s_, count + c_
            out[d] = total / count
        # Switching cost: in place vs reloading the base and adding the pack.
        g.activate([])
        t = time.perf_counter()
        for _ in range(5):
            g.activate([g.packs[-1]])
            g.activate([])
        switch = (time.perf_counter() - t) / 10
        g.close()
        return out, acc, switch

    table["routed (router per line)"], acc, switch = routed_losses(res.node("fuse:routed").output)
    g = GraftedModel.from_pretrained(res.node("fuse:routed").output)
    oracle = {}
    for d in DOMAINS:
        g.activate([] if d == "general" else [d])
        s_, c_ = seq_loss(g.model, seqs[d])
        oracle[d] = s_ / c_
    g.close()
    table["routed (right pack active)"] = oracle
    t = time.perf_counter()
    g = GraftedModel.from_pretrained(res.node("fuse:routed").output)
    g.activate(["lang"])
    reload_s = time.perf_counter() - t
    g.close()

    chain_bundle = res.node("fuse:chain").output
    table["chain routed (router per line)"], chain_acc, _ = routed_losses(chain_bundle)
    g = GraftedModel.from_pretrained(chain_bundle)
    chain_prefix: dict[str, float] = {}
    for d in SKILLS:
        g.activate([f"chain_{d}"])
        s_, c_ = seq_loss(g.model, seqs[d])
        chain_prefix[d] = s_ / c_
    g.activate(["chain_lang"])  # the whole chain active
    table["chain: all three packs active"] = {
        d: seq_loss(g.model, seqs[d])[0] / seq_loss(g.model, seqs[d])[1] for d in DOMAINS
    }
    g.close()
    chain_single = {}
    for d in SKILLS:
        node = f"graft:chain_{d}" if d != "lang" else None
        if node is not None:
            from graftbuild.skillpack.format import PACK_FILE  # noqa: F401

            chain_single[d] = losses(Store(work / "cache").object_path(res.node(node).output_hash))[
                d
            ]

    print(
        f"build time (all recipes, {args.steps} finetune steps each, skill lr {LR}): "
        f"{build_s:.0f} s\n"
    )
    print("| model | " + " | ".join(DOMAINS) + " |")
    print("|---|" + "---:|" * len(DOMAINS))
    for name, row in table.items():
        print(
            f"| {name} | " + " | ".join(f"{row[d]:.4f}" if d in row else "" for d in DOMAINS) + " |"
        )
    print()
    print("Routed vs single-pack graft (relative loss change, skill's own data):")
    for s in SKILLS:
        single = table[f"single-pack graft {s}"][s]
        r = table["routed (router per line)"][s]
        o = table["routed (right pack active)"][s]
        print(
            f"- {s}: right pack active {o:.4f} ({100 * (o / single - 1):+.2f}%), router {r:.4f} "
            f"({100 * (r / single - 1):+.2f}%) vs single-pack graft {single:.4f}"
        )
    b, r = table["base (general)"]["general"], table["routed (router per line)"]["general"]
    print(f"- general (base domain): routed {r:.4f} vs base {b:.4f}: {100 * (r / b - 1):+.2f}%")
    print()
    print("| strategy | " + " | ".join(DOMAINS) + " (base domain) |")
    print("|---|" + "---:|" * len(DOMAINS))
    for strat in ("routed (router per line)", "sum", "ties", "dare"):
        cells = [
            f"{100 * (table[strat][s] / table[f'single-pack graft {s}'][s] - 1):+.1f}%"
            for s in SKILLS
        ] + [f"{100 * (table[strat]['general'] / b - 1):+.1f}%"]
        print(f"| {strat} | " + " | ".join(cells) + " |")
    print()
    print("Router accuracy on held-out lines: " + ", ".join(f"{d} {a:.3f}" for d, a in acc.items()))
    print("Chain router accuracy: " + ", ".join(f"{d} {a:.3f}" for d, a in chain_acc.items()))
    print(
        f"Pack switch in place: {1000 * switch:.1f} ms; reload bundle + activate: "
        f"{1000 * reload_s:.1f} ms"
    )
    print()
    print(
        f"Chain: earlier packs rebuilt after adding lang: {rebuilt or 'none'}; "
        f"bytes unchanged: {same_bytes}"
    )
    for d in SKILLS:
        ref = chain_single.get(d)
        ref_s = f"graft:chain_{d} {ref:.4f}" if ref is not None else "(last pack)"
        print(
            f"- {d}: its chain prefix active {chain_prefix[d]:.4f}; {ref_s}; "
            f"routed {table['chain routed (router per line)'][d]:.4f}; "
            f"all three active {table['chain: all three packs active'][d]:.4f}"
        )


if __name__ == "__main__":
    main()
