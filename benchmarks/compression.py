"""Delta compressors compared at equal bytes on genuine fine-tuning deltas.

A 3.5M-parameter Llama is pre-trained on general text (with 5% of each skill's text), then
fully fine-tuned on distinct text skills (see _bench_models.py). Each skill's delta is
compressed to 1/4 ... 1/64 of its fp16 size by every method below, grafted onto the base, and
judged by the held-out loss on the skill:
``keep = (loss_base − loss_graft) / (loss_base − loss_source)``; the relative Frobenius error
of the whole delta is reported too. Bytes are counted exactly as each method would store them
(index costs included); 1-D tensors (norms) are stored as exact float32 by every method and
counted. Methods:

- ``svd``: truncated SVD per matrix, fp16 factors, rank chosen so the matrix gets its share;
- ``magnitude``: keep the largest |Δ| entries (int32 index + fp16 value each);
- ``dare``: keep a random subset rescaled by 1 / keep-rate (DARE), int32 index + fp16 value;
- ``bitdelta``: sign bit per entry × one fp16 scale per matrix (mean |Δ|; BitDelta without its
  scale distillation): always 1/16 of fp16, so shown only at 1/16;
- ``mixed-rtn`` / ``mixed-gptq``: graftbuild's mixed codec on every matrix, the paper's band
  shape (8-bit : 4-bit : 2-bit ranks = 1 : 9 : 50) scaled to the matrix's share; GPTQ with
  Hessians from the base on the skill's training text (embeddings have no linear input: RTN);
- ``budget-pack``: a real SkillPack written by graftbuild's pack step with ``budget = r`` and
  calibration: every matrix ``mixed`` (GPTQ), ranks and bits allocated across tensors by output
  error per byte. Its bytes are the pack file's payload.

Run: ``python benchmarks/compression.py`` (≈ 21 min on 2 busy CPU cores; trained models are
cached in ``--cache``, so a rerun only compresses and evaluates).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench_common import (
    BASELINES,
    baseline_at,
    finish,
    load_state,
    logger,
    markdown_tables,
    pack_step,
    per_matrix,
)
from _bench_models import DATA, build_models, chunks

RATIOS = (4, 8, 16, 32, 64)
PACKS: dict[str, dict[str, Any]] = {
    # graftbuild's real pack step under `budget = 1/r`; bytes are the whole pack file's
    "alloc": {"roles": "mixed", "calibration": True},  # the loss-aware allocator
    "uniform": {"roles": "mixed", "calibration": False},  # no calibration: the uniform split
    "sparse": {"roles": "sparse", "calibration": False},  # seeded-sparse everywhere, uniform
    "mix": {"roles": "mixed", "calibration": True, "mix": ["sparse", "lowrank", "mixed"]},
}
METHODS = ("svd", "magnitude", "dare", "bitdelta", "mixed-rtn", "mixed-gptq", *PACKS)
SETTINGS = {
    "base_steps": 200,
    "skill_steps": 300,
    "batch": 8,
    "seq_len": 64,
    "skill_lr": 3e-4,
    "skills": ["code", "lang"],
    "base_mix": 0.05,
}
CALIB: dict[str, Any] = {"samples": 64, "seq_len": 64, "damp": 0.01}
EVAL_CHUNKS = 64
BAND_SHAPE = ((8, 1), (4, 9), (2, 50))  # (bits, relative rank): the paper's 20 / 180 / 1000


# --- graftbuild's mixed codec at a byte budget ---------------------------------------------


def mixed_at(
    d: Any, nbytes: float, hessian: Any, group_size: int = 128, damp: float = 0.01
) -> tuple[Any, int]:
    """The mixed codec with the paper's band shape, scaled to fit ``nbytes``."""
    from graftbuild.compress.codecs import parse_spec
    from graftbuild.compress.codecs.mixed import _component_costs
    from graftbuild.compress.gptq import Calibration

    m, n = d.shape
    costs = dict(zip((2, 3, 4, 8), _component_costs(m, n, group_size), strict=True))
    unit = sum(rel * costs[bits] for bits, rel in BAND_SHAPE)
    alpha = nbytes / unit
    bands = []
    used = 0
    left = min(m, n)
    for bits, rel in BAND_SHAPE:
        r = min(left, int(alpha * rel))
        if r > 0:
            bands.append({"rank": r, "bits": bits})
            used += r
            left -= r
    if not bands:
        bands = [{"rank": 1, "bits": 2}]
    codec, params = parse_spec({"method": "mixed", "bands": bands, "group_size": group_size})
    cal = None if hessian is None or hessian.ndim != 2 else Calibration(hessian, damp=damp)
    enc = codec.encode(d, params, calibration=cal)
    return codec.decode(enc.parts, enc.meta, (m, n)), enc.nbytes


# --- harness ----------------------------------------------------------------------------------


def evaluate(model: Any, state: dict[str, Any], data: Any) -> float:
    import torch

    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        losses = [
            model(input_ids=data[i : i + 16], labels=data[i : i + 16]).loss.item()
            for i in range(0, len(data), 16)
        ]
    return sum(losses) / len(losses)


def compress(
    method: str,
    deltas: dict[str, Any],
    ratio: int,
    hessians: dict[str, Any],
    pack: Any,
) -> tuple[dict[str, Any], int]:
    """(reconstructed deltas, bytes) of one method at 1/ratio of the fp16 delta."""
    if method in PACKS:
        return pack(method, ratio)

    def encode(name: str, i: int, d: Any, nbytes: float) -> tuple[Any, int]:
        if method in BASELINES:
            return baseline_at(method, name, i, d, nbytes)
        if method == "mixed-rtn":
            return mixed_at(d, nbytes, None)
        return mixed_at(d, nbytes, hessians.get(name), damp=CALIB["damp"])

    return per_matrix(deltas, ratio, encode)


def budget_pack_fn(
    base_dir: Path, src_dir: Path, calib: Path, work: Path, extra: float = 0.0
) -> Any:
    """Runs graftbuild's real pack step with a budget and calibration; returns decoder.
    ``extra``: added to every budget (a share of the fp16 delta: ``--header-allowance``)."""

    def run(method: str, ratio: int) -> tuple[dict[str, Any], int]:
        spec = PACKS[method]
        roles = ("embed", "head", "attn", "mlp")
        options: dict[str, Any] = {role: {"method": spec["roles"]} for role in roles}
        if spec["calibration"]:
            options["calibration"] = {"data": calib, **CALIB}
        if spec.get("mix"):
            options["mix"] = spec["mix"]
        out = work / f"pack-{method}-{ratio}"
        files = {"calibration": calib}
        return pack_step(base_dir, src_dir, {**options, "budget": 1 / ratio + extra}, out, files)

    return run


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from graftbuild.compress.calibration import collect_statistics

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "gb-bench")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    ap.add_argument("--damp", type=float, default=CALIB["damp"], help="GPTQ damping")
    ap.add_argument("--calib-samples", type=int, default=CALIB["samples"])
    ap.add_argument(
        "--calib-model",
        choices=("base", "source"),
        default="base",
        help="whose activations mixed-gptq's Hessians come from (the fine-tuned: 'source')",
    )
    ap.add_argument(
        "--header-allowance",
        type=int,
        default=0,
        help="bytes added to graftbuild packs' budgets (to see what a free header would keep)",
    )
    args = ap.parse_args()
    CALIB["damp"] = args.damp
    CALIB["samples"] = args.calib_samples
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    ratios = [int(r) for r in args.ratios.split(",")]
    log = logger()
    folders = build_models(args.cache, SETTINGS, log)
    tok = AutoTokenizer.from_pretrained(str(folders["base"]))
    base_state = load_state(folders["base"])
    model = AutoModelForCausalLM.from_pretrained(str(folders["base"]))
    model.eval()
    results: list[dict[str, Any]] = []
    for skill in SETTINGS["skills"]:
        held = chunks(tok, skill, "heldout", SETTINGS["seq_len"])[:EVAL_CHUNKS]
        src_state = load_state(folders[skill])
        deltas = {k: src_state[k].float() - base_state[k].float() for k in base_state}
        loss_base = evaluate(model, base_state, held)
        loss_src = evaluate(model, src_state, held)
        norm = math.sqrt(sum(float(d.pow(2).sum()) for d in deltas.values()))
        log(f"{skill}: loss base {loss_base:.4f}, source {loss_src:.4f}")
        calib = DATA / f"{skill}.train.txt"
        calib_model = folders["base"] if args.calib_model == "base" else folders[skill]
        hessians = collect_statistics(calib_model, calib, CALIB["samples"], CALIB["seq_len"])
        total_fp16 = sum(2 * d.numel() for d in deltas.values())
        with tempfile.TemporaryDirectory() as work:
            extra = args.header_allowance / total_fp16
            pack = budget_pack_fn(folders["base"], folders[skill], calib, Path(work), extra)
            for ratio in ratios:
                for method in methods:
                    if method == "bitdelta" and ratio != 16:
                        continue
                    t = time.time()
                    rec, nbytes = compress(method, deltas, ratio, hessians, pack)
                    err = (
                        math.sqrt(sum(float((rec[k] - deltas[k]).pow(2).sum()) for k in deltas))
                        / norm
                    )
                    graft = {k: base_state[k].float() + rec[k] for k in base_state}
                    loss = evaluate(model, graft, held)
                    keep = (loss_base - loss) / (loss_base - loss_src)
                    row = {
                        "skill": skill,
                        "ratio": ratio,
                        "method": method,
                        "bytes": nbytes,
                        "size_vs_fp16": nbytes / total_fp16,
                        "rel_error": err,
                        "loss": loss,
                        "keep": keep,
                    }
                    results.append(row)
                    log(
                        f"{skill} 1/{ratio} {method:12s} bytes {nbytes / total_fp16:.4f}×fp16 "
                        f"err {err:.3f} keep {keep:.3f} ({time.time() - t:.1f}s)"
                    )
        results.append({"skill": skill, "loss_base": loss_base, "loss_source": loss_src})
    finish(results, args.json, table(results, methods, ratios))
    log("done")


def table(results: list[dict[str, Any]], methods: list[str], ratios: list[int]) -> str:
    return markdown_tables(
        results,
        methods,
        ratios,
        lambda info: (
            f"**{info['skill']}** (held-out loss: base {info['loss_base']:.3f}, "
            f"fine-tuned {info['loss_source']:.3f}). Cells: keep (relative error, size × fp16)"
        ),
        lambda r: f"{r['keep']:.1%} ({r['rel_error']:.2f}, {r['size_vs_fp16']:.4f})",
    )


if __name__ == "__main__":
    main()
