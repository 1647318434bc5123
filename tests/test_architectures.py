"""Twelve architectures as transformers builds them: tiny seeded inits saved with
``save_pretrained``, a fine-tune of each, packed and fused. A lossless profile fuses back to the
fine-tune; the default profile builds a model that loads and runs a forward pass. MoE experts and
router gates get roles of their own, and a profile compresses experts unlike dense MLPs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import load_weights, make

from graftbuild.skillpack import PackReader

COMMON = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 64,
}
MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}

ARCHS: dict[str, dict[str, Any]] = {
    "llama": COMMON,
    "mistral": COMMON,
    "qwen2": COMMON,
    "qwen3": COMMON,
    "gemma2": COMMON,
    "gemma3_text": COMMON,
    "phi3": {k: v for k, v in COMMON.items() if k != "head_dim"} | {"pad_token_id": 0},
    "gpt2": {"vocab_size": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64},
    "gpt_neox": {k: v for k, v in COMMON.items() if k not in ("head_dim", "num_key_value_heads")},
    "bert": {k: v for k, v in COMMON.items() if k not in ("head_dim", "num_key_value_heads")},
    "mixtral": COMMON | {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": COMMON | MOE | {"num_experts": 4, "decoder_sparse_step": 1},
}

RECIPE = """
[project]
name = "arch"
cache = "cache"

[base]
path = "models/base"

[compression.default]
expert = { method = "lowrank", rank = 2 }   # experts unlike dense MLPs (mixed)

[compression.lossless]
embed = "exact"
head = "exact"
attn = "exact"
mlp = "exact"
expert = "exact"
router = "exact"

[sources.lossless]
path = "models/ft"
compression = "lossless"

[sources.default]
path = "models/ft"

[[fuse]]
name = "lossless"
packs = ["lossless"]

[[fuse]]
name = "default"
packs = ["default"]
"""


def _auto(model_type: str) -> Any:
    import transformers as tf

    return tf.AutoModelForMaskedLM if model_type == "bert" else tf.AutoModelForCausalLM


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_architecture_packs_and_fuses(tmp_path: Path, model_type: str, one_torch_thread) -> None:
    from transformers import AutoConfig

    auto = _auto(model_type)
    torch.manual_seed(0)
    model = auto.from_config(AutoConfig.for_model(model_type, **ARCHS[model_type]))
    model.eval()
    model.save_pretrained(str(tmp_path / "models" / "base"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a fine-tune: a low-rank change and a little noise everywhere
        for p in model.parameters():
            if p.ndim == 2:
                m, n = p.shape
                low = torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g)
                p.add_(0.02 * low + 0.002 * torch.randn(m, n, generator=g))
            else:
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(tmp_path / "models" / "ft"))
    ft = load_weights(tmp_path / "models" / "ft")
    (tmp_path / "graftbuild.toml").write_text(RECIPE)

    result = make(tmp_path / "graftbuild.toml")

    lossless = load_weights(result.node("fuse:lossless").output)
    assert set(lossless) == set(ft)
    for k, v in ft.items():
        torch.testing.assert_close(lossless[k], v, rtol=0, atol=1e-6, msg=k)

    out = result.node("fuse:default").output
    fused = auto.from_pretrained(str(out))
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        logits = fused(ids).logits
    assert logits.shape[-1] == 64 and bool(torch.isfinite(logits).all())
    assert json.loads((out / "config.json").read_text())["model_type"] == model_type

    with PackReader(result.node("pack:default").output / "skillpack.safetensors") as r:
        roles: dict[str, set[str]] = {}
        for e in r.entries.values():
            roles.setdefault(e["role"], set()).add(e["codec"])
    assert {"embed", "attn", "norm"} <= set(roles), roles
    if model_type in ("mixtral", "qwen3_moe"):
        assert roles["expert"] == {"lowrank"} and roles["router"] == {"exact"}, roles
        assert "mlp" not in roles  # every MLP of these tiny models is an expert
    else:
        assert "mlp" in roles and "expert" not in roles and "router" not in roles, roles
        assert roles["mlp"] <= {"mixed", "exact"}  # exact: a fallback for a tiny matrix
