"""A calibrated budget pack with and without ``svd_memo`` (issue 22): the pack step's wall time
and its SVD count, side by side in one run, and whether the two packs have the same bytes.

With calibration a budget pack asks for each matrix's SVD four times: its rate model, the two
candidate allocations checked on the calibration text (loss-aware and uniform), and the pack
itself. ``svd_memo`` computes it once. Models: the tiny causal models of compression.py (3.5M
parameters, trained there and cached in ``--cache``), or with ``--wide H`` a seeded two-layer
Llama of width H whose "fine-tune" is the base plus seeded noise (the SVDs' cost grows as H³,
the calibration passes' as H²: how the share of the SVDs grows with the model); the pack step as
compression.py's ``alloc`` runs it.

Run: ``python benchmarks/budget_memo.py --cache /tmp/gb-bench`` (the cache compression.py
trains into) and ``... --wide 1024``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench_common import logger, pack_step
from _bench_models import DATA, TOKENIZER, build_models
from compression import CALIB, SETTINGS


def wide_models(root: Path, width: int) -> dict[str, Path]:
    """A seeded two-layer Llama of ``width`` and the same plus seeded noise (1% of each
    tensor's spread), with the quickstart tokenizer."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = {"base": root / f"wide{width}" / "base", "code": root / f"wide{width}" / "code"}
    if (out["code"] / "model.safetensors").exists():
        return out
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=width,
        intermediate_size=width * 11 // 4,
        num_hidden_layers=2,
        num_attention_heads=width // 64,
        num_key_value_heads=width // 64,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out["base"]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * float(p.std()) * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(out["code"]))
    for folder in out.values():
        for f in TOKENIZER.iterdir():
            shutil.copy(f, folder / f.name)
    return out


def main() -> None:
    import torch

    import graftbuild.compress.codecs._common as common

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "gb-bench")
    ap.add_argument("--ratios", default="16,64")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--wide", type=int, help="a seeded Llama of this width instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    log = logger()
    if args.wide:
        folders = wide_models(args.cache, args.wide)
    else:
        folders = build_models(args.cache, SETTINGS, log)
    skill = "code"
    calib = DATA / f"{skill}.train.txt"
    options: dict[str, Any] = {r: {"method": "mixed"} for r in ("embed", "head", "attn", "mlp")}
    options["calibration"] = {"data": calib, **CALIB}
    real_svd, calls = torch.linalg.svd, [0]

    def counting(*a: Any, **k: Any) -> Any:
        calls[0] += 1
        return real_svd(*a, **k)

    torch.linalg.svd = counting
    memo_bytes = common.SVD_MEMO_BYTES
    rows = []
    files = {"calibration": calib}
    with tempfile.TemporaryDirectory() as work:
        # one pack untimed: imports, the header estimate's probes, the page cache
        warm = {**options, "budget": 1 / 16}
        pack_step(folders["base"], folders[skill], warm, Path(work) / "warm", files, decode=False)
        for ratio in [int(r) for r in args.ratios.split(",")]:
            times: dict[str, list[float]] = {"memo": [], "none": []}
            cpu: dict[str, list[float]] = {"memo": [], "none": []}
            count: dict[str, int] = {}
            data: dict[str, bytes] = {}
            for i in range(args.rounds):
                for variant in ("memo", "none") if i % 2 == 0 else ("none", "memo"):
                    common.SVD_MEMO_BYTES = memo_bytes if variant == "memo" else 0
                    calls[0] = 0
                    out = Path(work) / f"{ratio}-{variant}-{i}"
                    t, c = time.perf_counter(), time.process_time()
                    opts = {**options, "budget": 1 / ratio}
                    pack_step(folders["base"], folders[skill], opts, out, files, decode=False)
                    times[variant].append(time.perf_counter() - t)
                    cpu[variant].append(time.process_time() - c)
                    count[variant] = calls[0]
                    data.setdefault(variant, (out / "skillpack.safetensors").read_bytes())
                    log(
                        f"1/{ratio} {variant}: {times[variant][-1]:.2f}s wall, "
                        f"{cpu[variant][-1]:.2f}s CPU, {calls[0]} SVDs"
                    )
            med = {v: statistics.median(t) for v, t in times.items()}
            low = {v: min(t) for v, t in times.items()}
            cpus = {v: statistics.median(t) for v, t in cpu.items()}
            rows.append(
                f"| 1/{ratio} | {med['none']:.2f} s [{low['none']:.2f}], {cpus['none']:.2f} s "
                f"({count['none']}) | {med['memo']:.2f} s [{low['memo']:.2f}], "
                f"{cpus['memo']:.2f} s ({count['memo']}) | "
                f"{med['none'] / med['memo']:.2f}× [{low['none'] / low['memo']:.2f}×], "
                f"{cpus['none'] / cpus['memo']:.2f}× | "
                f"{'yes' if data['memo'] == data['none'] else 'NO'} |"
            )
    common.SVD_MEMO_BYTES = memo_bytes
    print(
        "| budget | pack step without memo: wall median [min], CPU median (SVD calls) | with "
        "memo | speed-up: wall median [min], CPU | same bytes |"
    )
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
