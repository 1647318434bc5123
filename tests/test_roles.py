"""Role classification on the real tensor names of tiny Llama, GPT-2, BERT and GPT-NeoX models."""

from __future__ import annotations

import re

import pytest
import torch

from graftbuild.compress.roles import ROLES, classify


def _state_dict_shapes(family: str) -> dict[str, int]:
    """name -> ndim of a tiny randomly initialised model built from its config (no download)."""
    import transformers as tf

    if family == "llama":
        cfg = tf.LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=False,
        )
        cls = tf.LlamaForCausalLM
    elif family == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=64,
            n_embd=16,
            n_layer=2,
            n_head=2,
            n_positions=32,
            bos_token_id=0,
            eos_token_id=0,
        )
        cls = tf.GPT2LMHeadModel
    elif family == "bert":
        cfg = tf.BertConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
        )
        cls = tf.BertForMaskedLM
    else:
        cfg = tf.GPTNeoXConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=0,
        )
        cls = tf.GPTNeoXForCausalLM
    model = cls(cfg)
    return {name: t.ndim for name, t in model.state_dict().items()}


# What each family's names must map to: (regex on the name, role), first match wins.
EXPECTED: dict[str, list[tuple[str, str]]] = {
    "llama": [
        (r"embed_tokens", "embed"),
        (r"lm_head", "head"),
        (r"self_attn\.[qkvo]_proj", "attn"),
        (r"mlp\.(gate|up|down)_proj", "mlp"),
        (r"norm", "norm"),
    ],
    "gpt2": [
        (r"\.wte\.|\.wpe\.", "embed"),
        (r"lm_head", "head"),
        (r"\.ln_", "norm"),
        (r"\.bias$", "other"),
        (r"attn\.c_(attn|proj)\.weight", "attn"),
        (r"mlp\.c_(fc|proj)\.weight", "mlp"),
    ],
    "bert": [
        (r"LayerNorm", "norm"),
        (r"\.bias$", "other"),
        (r"_embeddings\.weight", "embed"),
        (r"predictions\.decoder\.weight", "head"),
        (r"attention\.self\.(query|key|value)\.weight", "attn"),
        (r"attention\.output\.dense\.weight", "attn"),
        (r"intermediate\.dense\.weight", "mlp"),
        (r"layer\.\d+\.output\.dense\.weight", "mlp"),
        (r"predictions\.transform\.dense\.weight", "other"),  # the MLM head's small transform
    ],
    "neox": [
        (r"embed_in", "embed"),
        (r"embed_out|lm_head", "head"),
        (r"layernorm|layer_norm", "norm"),
        (r"\.bias$", "other"),
        (r"attention\.(query_key_value|dense)\.weight", "attn"),
        (r"mlp\.dense_(h_to_4h|4h_to_h)\.weight", "mlp"),
    ],
}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def family(request: pytest.FixtureRequest) -> tuple[str, dict[str, int]]:
    with torch.device("meta"):
        return request.param, _state_dict_shapes(request.param)


def test_every_weight_gets_a_sensible_role(family: tuple[str, dict[str, int]]) -> None:
    name_of_family, shapes = family
    seen: set[str] = set()
    for name, ndim in shapes.items():
        role = classify(name, ndim)
        assert role in ROLES
        expected = next(
            (r for pattern, r in EXPECTED[name_of_family] if re.search(pattern, name)), None
        )
        assert role == expected, f"{name}: {role}, expected {expected}"
        seen.add(role)
    assert {"embed", "head", "attn", "mlp", "norm"} <= seen
    layer_matrices = [n for n, d in shapes.items() if d == 2 and re.search(r"\.\d+\.", n)]
    assert layer_matrices and all(classify(n, 2) in ("attn", "mlp") for n in layer_matrices)


@pytest.mark.parametrize(
    ("name", "ndim", "role"),
    [
        ("model.layers.3.self_attn.q_proj.weight", 2, "attn"),
        ("model.layers.3.self_attn.q_proj.bias", 1, "other"),
        ("model.layers.3.self_attn.q_norm.weight", 1, "norm"),
        ("model.layers.0.mlp.down_proj.weight", 2, "mlp"),
        ("model.norm.weight", 1, "norm"),
        ("transformer.h.0.attn.c_proj.weight", 2, "attn"),
        ("transformer.h.0.mlp.c_proj.weight", 2, "mlp"),
        ("transformer.ln_f.weight", 1, "norm"),
        ("bert.encoder.layer.11.attention.output.dense.weight", 2, "attn"),
        ("bert.encoder.layer.11.output.dense.weight", 2, "mlp"),
        ("bert.pooler.dense.weight", 2, "other"),
        ("gpt_neox.embed_in.weight", 2, "embed"),
        ("embed_out.weight", 2, "head"),
        ("model.layers.0.block_sparse_moe.experts.3.w2.weight", 2, "expert"),
        ("model.layers.0.block_sparse_moe.gate.weight", 2, "router"),
        ("model.layers.1.mlp.experts.7.gate_proj.weight", 2, "expert"),
        ("model.layers.1.mlp.experts.gate_up_proj", 3, "expert"),
        ("model.layers.1.mlp.gate.weight", 2, "router"),
        ("model.layers.1.mlp.shared_expert.up_proj.weight", 2, "mlp"),
        ("model.layers.1.mlp.shared_expert_gate.weight", 2, "router"),
        ("model.decoder.layers.0.fc1.weight", 2, "mlp"),
        ("score.weight", 2, "other"),
    ],
)
def test_known_names(name: str, ndim: int, role: str) -> None:
    assert classify(name, ndim) == role


def test_overrides_come_first() -> None:
    overrides = {r"layers\.0\.": "other", r"pooler": "mlp"}
    assert classify("model.layers.0.mlp.up_proj.weight", 2, overrides) == "other"
    assert classify("model.layers.1.mlp.up_proj.weight", 2, overrides) == "mlp"
    assert classify("bert.pooler.dense.weight", 2, overrides) == "mlp"
    assert classify("model.layers.0.input_layernorm.weight", 1, {"layernorm": "attn"}) == "attn"


def test_unknown_override_role_is_named() -> None:
    roles = "embed, head, attn, mlp, expert, router, norm, other"
    with pytest.raises(ValueError, match=rf"'attention'.*{roles}"):
        classify("model.norm.weight", 1, {"nothing-matches": "attention"})
