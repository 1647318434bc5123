"""A 7B-shaped slice packed and fused on the CPU and on a GPU, for ``device_check.sh --slice``.

    python benchmarks/device_slice.py --out DIR                    # 4 layers, CPU and cuda
    python benchmarks/device_slice.py --out DIR --devices cpu --layers 1 --vocab 8192   # rehearsal

The slice: Llama-3.1-8B's real layer dimensions (hidden 4096, MLP 14336, 32 heads of which 8
key/value heads (GQA), bf16), ``--layers`` of them (default 4) with the embedding and head
(``--vocab``, default 128256). Two synthetic fine-tunes: base + a rank-``--rank`` component of
relative size ``--lr-scale`` + dense noise of relative size ``--noise`` per matrix (a full
fine-tune's delta: ~0.5% of the weight's norm, low-rank-heavy spectrum, nowhere exactly
low-rank). Norms get small dense deltas.

Each device builds pack x, pack y and the fuse (``sum``, weights 1 and 0.5) in its own cache,
one node at a time, with the profile ``PROFILE`` (the default profile's codecs, with a rank
budget on attn/mlp so that the SVDs are randomized: the default profile's full SVDs of
4096×14336 matrices take minutes each on a CPU; ``--exact-svd`` times them per shape instead).

Reported (``DIR/device_slice.json`` and ``.md``): seconds per node and device, peak GPU memory
per node, host peak RSS; per-tensor encode time split into layers and the rest (the per-layer
figures the extrapolation to 32 and 80 layers uses); CPU/GPU agreement as the max relative
difference (max |a − b| / max |a| per tensor, the largest over tensors) of the decoded deltas
and of the fused weights, and the packs' relative error against the true deltas.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 4096, 14336, 32, 8
PROFILE = """
[compression.slice]
embed = { method = "prune", keep = 0.1 }
head = { method = "prune", keep = 0.1 }
attn = { method = "lowrank", energy = 0.9, max_rank = 64 }
mlp = { method = "lowrank", energy = 0.9, max_rank = 128 }
"""
RECIPE = """
[project]
name = "device-slice"
cache = "cache"

[base]
path = "{root}/base"
{profile}
[sources.x]
path = "{root}/x"
compression = "slice"

[sources.y]
path = "{root}/y"
compression = "slice"

[[fuse]]
name = "slice"
packs = ["x", "y"]
weights = {{ x = 1.0, y = 0.5 }}
"""


def shapes(layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the slice (Llama naming, as transformers saves it)."""
    kv = HIDDEN // HEADS * KV_HEADS
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out |= {
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (kv, HIDDEN),
            p + "self_attn.v_proj.weight": (kv, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        }
    out |= {"model.norm.weight": (HIDDEN,), "lm_head.weight": (vocab, HIDDEN)}
    return out


def make_slice(
    root: Path, layers: int, vocab: int, rank: int, lr_scale: float, noise: float
) -> None:
    """base/, x/, y/ under ``root``: bf16 safetensors and a Llama config."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        num_hidden_layers=layers,
        vocab_size=vocab,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    g = torch.Generator().manual_seed(0)
    base: dict[str, torch.Tensor] = {}
    for name, shape in shapes(layers, vocab).items():
        if len(shape) == 1:
            base[name] = (1.0 + 0.05 * torch.randn(shape, generator=g)).to(torch.bfloat16)
        else:
            base[name] = (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    for folder, tensors in (("base", base), *((s, None) for s in ("x", "y"))):
        (root / folder).mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(root / folder)
        if tensors is None:
            seed = {"x": 1, "y": 2}[folder]
            gs = torch.Generator().manual_seed(seed)
            tensors = {}
            for name, b in base.items():
                w = b.float()
                if w.ndim == 1:
                    d = 0.01 * torch.randn(w.shape, generator=gs)
                else:
                    m, n = w.shape
                    low = torch.randn(m, rank, generator=gs) @ torch.randn(rank, n, generator=gs)
                    low *= lr_scale * w.norm() / low.norm()
                    d = low + noise * float(w.abs().mean()) * torch.randn(m, n, generator=gs)
                tensors[name] = (w + d).to(torch.bfloat16)
                del w, d
        save_file(tensors, str(root / folder / "model.safetensors"), metadata={"format": "pt"})
        del tensors


def build(recipe_path: Path, cache: Path, device: str, jobs: int) -> dict:
    """pack x, pack y, fuse, one node at a time; seconds, peak GPU memory and per-tensor encode
    seconds per node."""
    import torch

    from graftbuild.build.engine import Engine
    from graftbuild.cache.store import Store
    from graftbuild.recipe import load_recipe
    from graftbuild.skillpack import writer as pack_writer
    from graftbuild.steps.base import BuildSettings

    encode_s: dict[str, float] = defaultdict(float)
    original = pack_writer.encode_with

    def timed_encode(codec, params, delta, calibration=None):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        out = original(codec, params, delta, calibration)
        if delta.is_cuda:
            torch.cuda.synchronize()
        encode_s[codec.name + ":" + "x".join(map(str, delta.shape))] += time.perf_counter() - t
        return out

    pack_writer.encode_with = timed_encode
    recipe = load_recipe(recipe_path)
    engine = Engine(recipe, Store(cache), BuildSettings(device=device, jobs=jobs))
    engine.write_lock = False
    nodes = {}
    try:
        for target in ("pack:x", "pack:y", "fuse:slice"):
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            encode_s.clear()
            t = time.perf_counter()
            result = engine.make([target])
            took = time.perf_counter() - t
            node = result.node(target)
            nodes[target] = {
                "seconds": round(took, 2),
                "output_hash": node.output_hash,
                "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20)
                if device.startswith("cuda")
                else None,
                "encode_s_by_shape": {k: round(v, 3) for k, v in sorted(encode_s.items())},
            }
            print(f"{device} {target}: {took:.1f} s", flush=True)
    finally:
        pack_writer.encode_with = original
    return {"nodes": nodes, "store": engine.store}


def rel(a, b) -> float:  # type: ignore[no-untyped-def]
    """max |a - b| / max |b| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)


def compare_packs(pack_a: Path, pack_b: Path, root: Path, source: str) -> dict:
    """Decoded deltas of two packs of the same source: max relative difference between them, and
    each one's relative Frobenius error against the true delta (source - base)."""
    from graftbuild.skillpack import PackReader
    from graftbuild.weights.tensors import ModelWeights

    worst, err_a, err_b = 0.0, 0.0, 0.0
    with (
        PackReader(pack_a) as ra,
        PackReader(pack_b) as rb,
        ModelWeights(root / "base") as base,
        ModelWeights(root / source) as src,
    ):
        for name in ra.names():
            da, db = ra.decode(name), rb.decode(name)
            worst = max(worst, rel(db, da))
            true = src.get(name).float() - base.get(name).float()
            n = float(true.norm()) or 1.0
            err_a = max(err_a, float((da - true).norm()) / n)
            err_b = max(err_b, float((db - true).norm()) / n)
    return {"max_rel_diff": worst, "max_rel_frobenius_error": [err_a, err_b]}


def svd_timings(device: str, big: bool) -> list[dict]:
    """Exact (full) SVD, as the default profile's attn ``energy`` and mlp ``mixed`` codecs run it,
    against the randomized SVD at ranks 64 and 256, once per matrix shape of a layer."""
    import torch

    from graftbuild.compress.codecs._common import randomized_svd, svd

    kv = HIDDEN // HEADS * KV_HEADS
    cases = [(kv, HIDDEN), (HIDDEN, HIDDEN)] + ([(INTERMEDIATE, HIDDEN)] if big else [])
    rows = []
    g = torch.Generator().manual_seed(0)
    for m, n in cases:
        x = (0.01 * torch.randn(m, n, generator=g)).to(device)

        def clock(fn) -> float:  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return round(time.perf_counter() - t, 3)

        row = {"device": device, "shape": [m, n], "exact_s": clock(lambda x=x: svd(x))}
        for k in (64, 256):
            row[f"randomized_{k}_s"] = clock(lambda k=k, x=x: randomized_svd(x, k))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--lr-scale", type=float, default=0.005)
    ap.add_argument("--noise", type=float, default=0.002)
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--exact-svd", choices=["none", "small", "all"], default="all")
    ap.add_argument("--work", type=Path)
    args = ap.parse_args()

    from graftbuild.weights.determinism import pin_environment

    pin_environment()
    import torch

    devices = args.devices.split(",")
    if any(d.startswith("cuda") for d in devices) and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --devices cpu (a rehearsal)")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="device_slice."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        make_slice(work / "models", args.layers, args.vocab, args.rank, args.lr_scale, args.noise)
        gen_s = round(time.perf_counter() - t, 1)
        recipe = work / "graftbuild.toml"
        recipe.write_text(RECIPE.format(root=work / "models", profile=PROFILE))
        runs = {d: build(recipe, work / f"cache-{d}", d, args.jobs) for d in devices}
        report: dict = {
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__,
            "layers": args.layers,
            "vocab": args.vocab,
            "model_bytes": (work / "models" / "base" / "model.safetensors").stat().st_size,
            "generate_s": gen_s,
            "host_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "nodes": {d: r["nodes"] for d, r in runs.items()},
        }
        if len(devices) == 2:
            a, b = (runs[d] for d in devices)
            agree = {}
            for src in ("x", "y"):
                pa = a["store"].object_path(a["nodes"][f"pack:{src}"]["output_hash"])
                pb = b["store"].object_path(b["nodes"][f"pack:{src}"]["output_hash"])
                agree[f"pack:{src}"] = compare_packs(
                    pa / "skillpack.safetensors", pb / "skillpack.safetensors", work / "models", src
                )
            from graftbuild.weights.compare import max_relative_difference

            fa = a["store"].object_path(a["nodes"]["fuse:slice"]["output_hash"])
            fb = b["store"].object_path(b["nodes"]["fuse:slice"]["output_hash"])
            agree["fuse:slice"] = {"max_rel_diff": max_relative_difference(fb, fa)}
            report["agreement"] = agree
        else:  # one device: the packs' own error against the true deltas
            r = runs[devices[0]]
            p = (
                r["store"].object_path(r["nodes"]["pack:x"]["output_hash"])
                / "skillpack.safetensors"
            )
            report["pack_x_quality"] = compare_packs(p, p, work / "models", "x")
        names = shapes(args.layers, args.vocab)
        layer_bytes = sum(2 * math.prod(s) for n, s in names.items() if ".layers." in n)
        report["layer_share_of_bytes"] = round(layer_bytes / report["model_bytes"], 4)
        if args.exact_svd != "none":
            report["svd"] = [
                row
                for d in devices
                for row in svd_timings(d if d != "cuda" else "cuda", args.exact_svd == "all")
            ]
        (args.out / "device_slice.json").write_text(json.dumps(report, indent=1, default=str))
        (args.out / "device_slice.md").write_text(markdown(report, devices))
        print(markdown(report, devices))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def markdown(report: dict, devices: list[str]) -> str:
    lines = [
        f"GPU: {report['gpu'] or 'none (not run on a GPU)'}; torch {report['torch']}; "
        f"{report['layers']} layers, vocab {report['vocab']}, {report['model_bytes'] / 1e9:.2f} GB "
        f"per model (bf16); host peak RSS {report['host_peak_rss_mb']} MB",
        "",
        "| node | " + " | ".join(f"{d} s" for d in devices) + " | peak GPU MB |",
        "|---|" + "---|" * len(devices) + "---|",
    ]
    for node in ("pack:x", "pack:y", "fuse:slice"):
        secs = [str(report["nodes"][d][node]["seconds"]) for d in devices]
        gpu = [report["nodes"][d][node]["peak_gpu_mb"] for d in devices if d.startswith("cuda")]
        lines.append(f"| {node} | " + " | ".join(secs) + f" | {gpu[0] if gpu else '-'} |")
    if "agreement" in report:
        lines += ["", "| CPU vs GPU | max rel. diff |", "|---|---|"]
        lines += [f"| {k} | {v['max_rel_diff']:.2e} |" for k, v in report["agreement"].items()]
    for row in report.get("svd", []):
        lines.append(
            f"SVD {row['device']} {row['shape']}: exact {row['exact_s']} s, randomized "
            f"k=64 {row['randomized_64_s']} s, k=256 {row['randomized_256_s']} s"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
