"""How many tensor-sized buffers each fusion strategy holds while it merges one tensor.

    python benchmarks/fusion_memory.py --out benchmarks/results/fusion_memory.json

Each strategy merges one 32000x1024 float32 tensor (the benchmark models' embedding, their
largest) from two packs' deltas (one for the one-pack methods), in a fresh process: the peak RSS
of ``combine`` above what the inputs (base and deltas, as the fuse loop holds them) already
took, in units of that tensor, the output included. The fuse streams tensor by tensor, so this,
times the model's largest tensor, is what a method adds to the `sum` fuse's peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPE = (32000, 1024)
ONE_PACK = ("slerp", "nearswap", "arcee_fusion", "passthrough")
NO_WEIGHTS = ("slerp", "nearswap", "arcee_fusion", "passthrough", "karcher", "model_stock", "sce")
OPTIONS = {
    "ties": {"density": 0.5},
    "dare_linear": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "breadcrumbs": {"density": 0.5},
    "breadcrumbs_ties": {"density": 0.5},
    "della": {"density": 0.5, "epsilon": 0.1},
    "della_linear": {"density": 0.5, "epsilon": 0.1},
    "slerp": {"t": 0.5},
    "nearswap": {"t": 0.001},
    "sce": {"select_topk": 0.5},
}
METHODS = [
    "sum", "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "slerp", "nuslerp", "multislerp", "karcher",
    "sce", "model_stock", "nearswap", "arcee_fusion", "passthrough",
]  # fmt: skip


def one(name: str) -> float:
    """Peak over the inputs, in tensors, of one ``combine`` (run in this process)."""
    import torch

    from graftbuild.fusion import get_strategy
    from graftbuild.fusion.schedule import Bound

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    k = 1 if name in ONE_PACK else 2
    # Built in place, so no temporary raises the high-water mark before the merge.
    base = torch.empty(SHAPE).normal_(generator=g).mul_(0.02)
    deltas = [
        torch.empty(SHAPE).normal_(generator=g).mul_(0.002).add_(base, alpha=0.05) for _ in range(k)
    ]
    own = base.clone()  # the fuse hands the strategy its own copy of the base
    strategy = get_strategy(name)
    params = strategy.Params(**OPTIONS.get(name, {}))
    if hasattr(strategy, "bind"):
        per = [{} for _ in range(k)] if name in NO_WEIGHTS else [{"weight": 1.0 / k}] * k
        params = Bound(params, per, 8, [1.0] * k)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    strategy.combine(own, deltas, [1.0] * k, params, "model.embed_tokens.weight")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round((after - before) * 1024 / (base.numel() * 4), 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", help=argparse.SUPPRESS)  # one method, in a child process
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.method:
        print(one(args.method))
        return
    root = Path(__file__).resolve().parents[1]
    res = {}
    for name in METHODS:
        proc = subprocess.run(
            [sys.executable, __file__, "--method", name],
            capture_output=True, text=True, check=True, cwd=root,
        )  # fmt: skip
        res[name] = float(proc.stdout.split()[-1])
        print(f"{name}: {res[name]} tensors over the inputs", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"shape": SHAPE, "tensors_over_inputs": res}, indent=1))


if __name__ == "__main__":
    main()
