"""Generate a synthetic benchmark model set: a random-init Llama base and two synthetic
fine-tunes (each = base + a low-rank component + small dense noise), float32 safetensors.

    python benchmarks/make_models.py /tmp/gb-bench/m07 --size 0.7gb

Tensors are generated and written one at a time (per-tensor seeds), so memory stays at a few
tensors whatever the size. Sizes are Llama shapes; ``3gb`` is the ``0.7gb`` width at 54 layers
(4.5x the parameters by depth: the largest tensor, the embedding, is the same).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {
    "tiny": {"hidden": 64, "inter": 176, "layers": 2, "vocab": 1000},
    "small": {"hidden": 512, "inter": 1408, "layers": 8, "vocab": 32000},
    "0.7gb": {"hidden": 1024, "inter": 2816, "layers": 8, "vocab": 32000},
    "2gb": {"hidden": 2048, "inter": 5632, "layers": 7, "vocab": 32000},
    "3gb": {"hidden": 1024, "inter": 2816, "layers": 54, "vocab": 32000},
}
RANK = 8
SCALE = 0.002


def shapes(s: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = s["hidden"], s["inter"], s["vocab"]
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for layer in range(s["layers"]):
        p = f"model.layers.{layer}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        out += [(p + f"self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
        out += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h))]
        out += [(p + "mlp.down_proj.weight", (h, i))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def config(s: dict[str, int]) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s["hidden"],
        "intermediate_size": s["inter"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["hidden"] // 64,
        "num_key_value_heads": s["hidden"] // 64,
        "vocab_size": s["vocab"],
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def tensor(name: str, index: int, shape: tuple[int, ...], model: int):
    """Model 0 is the base; model k > 0 is base + its own low-rank component + noise."""
    import torch

    g = torch.Generator().manual_seed(index)
    base = torch.ones(shape) if len(shape) == 1 else 0.02 * torch.randn(shape, generator=g)
    if model == 0:
        return base
    g = torch.Generator().manual_seed(1_000_003 * model + index)
    if len(shape) == 1:
        return base + 0.01 * torch.randn(shape, generator=g)
    m, n = shape
    low = torch.randn(m, RANK, generator=g) @ torch.randn(RANK, n, generator=g) / RANK
    return base + SCALE * low + 0.1 * SCALE * torch.randn(shape, generator=g)


def write_model(folder: Path, size: dict[str, int], model: int) -> None:
    from graftbuild.weights.tensors import TensorInfo, write_model_weights

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config(size), indent=2) + "\n")
    items = shapes(size)
    infos = [TensorInfo(n, s, "F32", folder) for n, s in items]
    stream = ((n, tensor(n, i, s, model)) for i, (n, s) in enumerate(items))
    write_model_weights(folder, infos, stream, shard_size=2**62)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    args = ap.parse_args()
    size = SIZES[args.size]
    for model, name in enumerate(("base", "x", "y")):
        write_model(args.out / name, size, model)
        print(f"wrote {args.out / name}", flush=True)


if __name__ == "__main__":
    main()
