"""mergekit 0.1.5 as a test oracle: the same configs merged by mergekit and by graftbuild.

mergekit is never a dependency: it lives in its own venv (``GRAFTBUILD_MERGEKIT_VENV``, default
/work/venvs/mergekit; CI creates it, see .ci/run). One driver process runs every mergekit merge
of a test (torch loads once). graftbuild imports the same YAML with ``graftbuild import
mergekit`` and builds it with ``make``.

Deterministic methods must agree within ``‖a − b‖∞ / ‖b‖∞ ≤ 1e-4`` per tensor; random ones in
distribution: the fraction of entries the merge changes and the norm of the merged delta, over
the whole model, within 5%.

Run the full suite (every method, the four example configs) as a script:

    python tests/mergekit_oracle.py [--work DIR]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

MERGEKIT_VENV = Path(os.environ.get("GRAFTBUILD_MERGEKIT_VENV", "/work/venvs/mergekit"))
MERGEKIT_PY = MERGEKIT_VENV / "bin" / "python"
TOLERANCE = 1e-4
DISTRIBUTION_TOLERANCE = 0.05
SEED = 1234

DRIVER = """
import json, sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for job in json.loads(sys.argv[1]):
    cfg = MergeConfiguration.model_validate(yaml.safe_load(open(job["config"])))
    opts = MergeOptions(random_seed=job.get("seed"), write_model_card=False, quiet=True,
                        copy_tokenizer=False)
    run_merge(cfg, job["out"], opts)
"""

LAYERS = 4
# Methods that draw random masks: compared in distribution, not entry by entry.
RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}


def tiny_config() -> dict[str, Any]:
    from tests.conftest import TINY_LLAMA

    return TINY_LLAMA | {"num_hidden_layers": LAYERS}


def make_models(root: Path) -> Path:
    """base, and four fine-tunes a, b, c, d of it (tiny Llama, seeded)."""
    from tests.conftest import make_base, make_source

    if (root / "d" / "config.json").is_file():
        return root
    make_base(root / "base", seed=0, config=tiny_config())
    cfg_path = root / "base" / "config.json"  # mergekit picks its architecture by this name
    cfg_path.write_text(
        json.dumps(json.loads(cfg_path.read_text()) | {"architectures": ["LlamaForCausalLM"]})
    )
    for i, name in enumerate("abcd"):
        make_source(root / name, root / "base", seed=10 + i)
    return root


def cases(models: Path) -> dict[str, dict[str, Any]]:
    """One mergekit config per method, exercising its parameters (gradients, filters, per-model
    values) on the tiny models."""
    m = {k: str(models / k) for k in ("base", "a", "b", "c", "d")}

    def ms(*entries: tuple[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
        return [{"model": m[k], **({"parameters": p} if p else {})} for k, p in entries]

    grad_w = [{"filter": "mlp", "value": [0.2, 0.9]}, {"value": 0.6}]
    gta = {
        "models": ms(
            ("a", {"weight": 0.7, "density": [0.9, 0.4]}),
            ("b", {"weight": grad_w}),
            ("c", {"weight": 0.4, "density": 0.6}),
        ),
        "base_model": m["base"],
        "parameters": {"density": 0.5},
        "dtype": "float32",
    }
    della = gta | {
        "models": ms(
            ("a", {"weight": 0.7, "density": [0.6, 0.4]}),
            ("b", {"weight": grad_w}),
            ("c", {"weight": 0.4, "density": 0.6}),
        )
    }
    out: dict[str, dict[str, Any]] = {
        "linear": {
            "models": ms(
                ("a", {"weight": 1.0}), ("b", {"weight": [0.2, 0.8]}), ("c", {"weight": grad_w})
            ),
            "merge_method": "linear",
            "dtype": "float32",
        },
        "task_arithmetic": gta | {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.8}},
        "ties": gta
        | {
            "merge_method": "ties",
            "parameters": {"density": 0.5, "normalize": True, "int8_mask": True},
        },
        "dare_linear": gta | {"merge_method": "dare_linear"},
        "dare_ties": gta | {"merge_method": "dare_ties"},
        "breadcrumbs": gta
        | {"merge_method": "breadcrumbs", "parameters": {"density": 0.6, "gamma": 0.05}},
        "breadcrumbs_ties": gta
        | {"merge_method": "breadcrumbs_ties", "parameters": {"density": 0.6, "gamma": 0.02}},
        "della": della | {"merge_method": "della", "parameters": {"epsilon": 0.1, "density": 0.5}},
        "della_linear": della
        | {"merge_method": "della_linear", "parameters": {"epsilon": 0.2, "density": 0.5}},
        "slerp": {
            "slices": [
                {
                    "sources": [
                        {"model": m["base"], "layer_range": [0, LAYERS]},
                        {"model": m["a"], "layer_range": [0, LAYERS]},
                    ]
                }
            ],
            "merge_method": "slerp",
            "base_model": m["base"],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
            "dtype": "float32",
        },
        "nuslerp": {
            "models": ms(("a", {"weight": 0.3}), ("b", {"weight": 0.7})),
            "merge_method": "nuslerp",
            "base_model": m["base"],
            "dtype": "float32",
        },
        "multislerp": {
            "models": ms(("a", {"weight": 1.0}), ("b", {"weight": 0.5}), ("c", {"weight": 0.8})),
            "merge_method": "multislerp",
            "base_model": m["base"],
            "dtype": "float32",
        },
        "karcher": {
            "models": ms(("a", None), ("b", None), ("c", None)),
            "merge_method": "karcher",
            "parameters": {"max_iter": 20},
            "dtype": "float32",
        },
        "sce": {
            "models": ms(("a", None), ("b", None), ("c", None)),
            "merge_method": "sce",
            "base_model": m["base"],
            "parameters": {"select_topk": 0.5},
            "dtype": "float32",
        },
        "model_stock": {
            "models": ms(("a", None), ("b", None), ("c", None)),
            "merge_method": "model_stock",
            "base_model": m["base"],
            "dtype": "float32",
        },
        "nearswap": {
            "models": ms(("base", None), ("a", None)),
            "merge_method": "nearswap",
            "base_model": m["base"],
            "parameters": {"t": 0.02},
            "dtype": "float32",
        },
        "arcee_fusion": {
            "models": ms(("base", None), ("a", None)),
            "merge_method": "arcee_fusion",
            "base_model": m["base"],
            "dtype": "float32",
        },
        "passthrough": {
            "models": ms(("a", {"scale": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]})),
            "merge_method": "passthrough",
            "dtype": "float32",
        },
    }
    return out


def stacks(models: Path) -> dict[str, dict[str, Any]]:
    """Layer stacking with ``slices``: a passthrough "frankenmerge" (6 layers from 4) and a
    slerp of unaligned layer ranges."""
    m = {k: str(models / k) for k in ("base", "a", "b")}

    def src(k: str, a: int, b: int) -> dict[str, Any]:
        return {"model": m[k], "layer_range": [a, b]}

    return {
        "stack-passthrough": {
            "slices": [{"sources": [src("a", 0, 3)]}, {"sources": [src("b", 1, 4)]}],
            "merge_method": "passthrough",
            "dtype": "float32",
        },
        "stack-slerp": {
            "slices": [
                {"sources": [src("base", 0, 2), src("a", 2, 4)]},
                {"sources": [src("base", 1, 4), src("a", 0, 3)]},
            ],
            "merge_method": "slerp",
            "base_model": m["base"],
            "parameters": {"t": [{"filter": "mlp", "value": [0.2, 0.9]}, {"value": 0.4}]},
            "dtype": "float32",
        },
    }


def examples(models: Path) -> dict[str, dict[str, Any]]:
    """mergekit's examples/{linear,ties,bio-merge,gradient-slerp}.yml with local models for
    the hub ids, and float32 for their float16/bfloat16 (so both tools compute alike)."""
    m = {k: str(models / k) for k in ("base", "a", "b", "c")}
    return {
        "example-linear": {
            "models": [
                {"model": m["a"], "parameters": {"weight": 1.0}},
                {"model": m["b"], "parameters": {"weight": 0.3}},
                {"model": m["c"], "parameters": {"weight": 0.5}},
            ],
            "merge_method": "linear",
            "dtype": "float32",
        },
        "example-ties": {
            "models": [
                {"model": m["a"], "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
                {"model": m["b"], "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
                {
                    "model": m["c"],
                    "parameters": {
                        "density": 0.33,
                        "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}],
                    },
                },
            ],
            "merge_method": "ties",
            "base_model": m["base"],
            "parameters": {"normalize": True, "int8_mask": True},
            "dtype": "float32",
        },
        "example-bio-merge": {
            "models": [
                {"model": m["a"], "parameters": {"density": 0.5, "weight": 0.5}},
                {"model": m["b"], "parameters": {"density": 0.5, "weight": 0.5}},
            ],
            "merge_method": "ties",
            "base_model": m["base"],
            "parameters": {"normalize": False, "int8_mask": True},
            "dtype": "float32",
        },
        "example-gradient-slerp": {
            "slices": [
                {
                    "sources": [
                        {"model": m["a"], "layer_range": [0, LAYERS]},
                        {"model": m["b"], "layer_range": [0, LAYERS]},
                    ]
                }
            ],
            "merge_method": "slerp",
            "base_model": m["a"],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
            "dtype": "float32",
        },
    }


def write_configs(work: Path, configs: dict[str, dict[str, Any]]) -> dict[str, Path]:
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, cfg in configs.items():
        path = work / f"{name}.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        out[name] = path
    return out


def run_mergekit(jobs: list[tuple[Path, Path]], seed: int | None = SEED) -> None:
    """Merge every (config, output folder) with mergekit, in one process."""
    todo = [{"config": str(c), "out": str(o), "seed": seed} for c, o in jobs]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [str(MERGEKIT_PY), "-c", DRIVER, json.dumps(todo)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"mergekit failed:\n{proc.stderr[-4000:]}")


def graftbuild_build(config: Path, work: Path, seed: int = SEED) -> Path:
    """``graftbuild import mergekit`` then ``make``; the fused folder."""
    from click.testing import CliRunner

    from graftbuild.cli.app import main
    from tests.helpers import make

    recipe = work / f"{config.stem}.toml"
    res = CliRunner().invoke(
        main, ["import", "mergekit", str(config), "-o", str(recipe), "--seed", str(seed), "--force"]
    )
    if res.exit_code != 0:
        raise RuntimeError(f"import {config}: exit {res.exit_code}: {res.output}")
    text = recipe.read_text().replace("[project]\n", f'[project]\ncache = "{work / "cache"}"\n', 1)
    recipe.write_text(text)
    result = make(recipe)
    fuse = next(n.id for n in result.nodes if n.id.startswith("fuse:"))
    return result.node(fuse).output


def load(folder: Path) -> dict[str, Any]:
    from tests.helpers import load_weights

    return load_weights(folder)


def max_rel_diff(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float]:
    """‖a − b‖∞ / ‖b‖∞ per tensor (tensors of the same names required)."""
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    out = {}
    for name, b in theirs.items():
        a = ours[name].float()
        b = b.float()
        scale = float(b.abs().max()) or 1.0
        out[name] = float((a - b).abs().max()) / scale
    return out


def delta_stats(merged: dict[str, Any], base: dict[str, Any]) -> tuple[float, float]:
    """(fraction of entries the merge changed, L2 norm of the merged delta), whole model."""
    changed = total = 0
    sq = 0.0
    for name, t in merged.items():
        d = t.float() - base[name].float()
        changed += int((d != 0).sum())
        total += d.numel()
        sq += float(d.square().sum())
    return changed / total, sq**0.5


def check(method: str, ours: Path, theirs: Path, base: Path) -> dict[str, float]:
    """The comparison the tests assert; returns the numbers for the report."""
    a, b = load(ours), load(theirs)
    if method in RANDOM:
        base_w = load(base)
        (fa, na), (fb, nb) = delta_stats(a, base_w), delta_stats(b, base_w)
        return {
            "density_ours": fa,
            "density_mergekit": fb,
            "norm_ours": na,
            "norm_mergekit": nb,
            "density_rel": abs(fa - fb) / fb,
            "norm_rel": abs(na - nb) / nb,
        }
    diffs = max_rel_diff(a, b)
    worst = max(diffs, key=diffs.__getitem__)
    return {"max_rel_diff": diffs[worst], "worst_tensor": worst}  # type: ignore[dict-item]


def passes(method: str, result: dict[str, Any]) -> bool:
    if method in RANDOM:
        return max(result["density_rel"], result["norm_rel"]) <= DISTRIBUTION_TOLERANCE
    return result["max_rel_diff"] <= TOLERANCE


def main(argv: list[str]) -> int:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.mkdtemp(prefix="mk-parity-")))
    ap.add_argument("--only", nargs="*", help="methods or examples to run (default: all)")
    args = ap.parse_args(argv)
    models = make_models(args.work / "models")
    configs = cases(models) | stacks(models) | examples(models)
    if args.only:
        configs = {k: v for k, v in configs.items() if k in args.only}
    paths = write_configs(args.work / "configs", configs)
    run_mergekit([(p, args.work / "mk" / n) for n, p in paths.items()])
    failed = 0
    for name, path in paths.items():
        ours = graftbuild_build(path, args.work / "gb")
        method = configs[name]["merge_method"]
        res = check(method, ours, args.work / "mk" / name, models / "base")
        ok = passes(method, res)
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name:24s} {json.dumps(res)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main(sys.argv[1:]))
