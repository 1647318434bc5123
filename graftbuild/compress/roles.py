"""Module roles: which compression operator a tensor gets, decided from its name.

GraftLLM compresses each module by role (embeddings and the head are pruned, attention goes
low-rank, MLPs get mixed-precision SVD, norms and biases are stored exactly). The role comes from
the tensor's name in the Hugging Face state dict; the patterns below cover the Llama / Mistral /
Qwen2, GPT-2, BERT and GPT-NeoX families and the Mixtral / Qwen-MoE experts, and recipes can
override them with regexes. A mixture-of-experts layer's experts (``expert``) and its router gate
(``router``) have roles of their own, so a profile can compress experts differently from dense
MLPs (each expert sees a fraction of the tokens) and keep the small, sensitive router exact.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

ROLES: tuple[str, ...] = ("embed", "head", "attn", "mlp", "expert", "router", "norm", "other")

# A name component is a dot-separated piece; (^|\.) ... (\.|$) anchors patterns to whole pieces.
_NORM = re.compile(r"(^|\.)(\w*norm\w*|ln_\w+|ln\d*)(\.|$)", re.IGNORECASE)
_EMBED = re.compile(
    r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings"
    r"|embed_in|embed_positions|tok_embeddings)(\.|$)"
)
_HEAD = re.compile(r"(^|\.)(lm_head|embed_out)(\.|$)|(^|\.)predictions\.decoder(\.|$)")
_ATTN = (
    # Llama / Mistral / Qwen2 / OPT, GPT-2, GPT-NeoX.
    re.compile(
        r"(^|\.)(self_attn|attn|attention|self_attention)\."
        r"(q_proj|k_proj|v_proj|o_proj|qkv_proj|out_proj|c_attn|c_proj|query_key_value|dense)"
        r"(\.|$)"
    ),
    # BERT.
    re.compile(r"(^|\.)attention\.self\.(query|key|value)(\.|$)"),
    re.compile(r"(^|\.)attention\.output\.dense(\.|$)"),
)
_MLP = (
    re.compile(
        r"(^|\.)(mlp|feed_forward|ffn)\."
        r"(gate_proj|up_proj|down_proj|gate_up_proj|c_fc|c_proj|fc1|fc2|w1|w2|w3"
        r"|dense_h_to_4h|dense_4h_to_h)(\.|$)"
    ),
    re.compile(r"(^|\.)(dense_h_to_4h|dense_4h_to_h)(\.|$)"),
    # BERT: the intermediate projection and the layer's own output projection. The attention
    # block's `attention.output.dense` is matched as attn before we get here.
    re.compile(r"(^|\.)intermediate\.dense(\.|$)"),
    re.compile(r"(^|\.)layer\.\d+\.output\.dense(\.|$)"),
    # OPT-style layers.N.fc1 / fc2.
    re.compile(r"(^|\.)(layers|layer|h)\.\d+\.(fc1|fc2)(\.|$)"),
    # Qwen2-MoE's shared expert runs on every token: a dense MLP.
    re.compile(r"(^|\.)shared_experts?\.(gate_proj|up_proj|down_proj)(\.|$)"),
)
# Mixture-of-experts: one expert's projections (Mixtral `experts.N.w1`, Qwen-MoE
# `experts.N.gate_proj`), or all experts stacked in one 3-D tensor (`experts.gate_up_proj`).
_EXPERT = re.compile(
    r"(^|\.)experts\.(\d+\.)?(w1|w2|w3|gate_proj|up_proj|down_proj|gate_up_proj)(\.|$)"
)
# The router: Mixtral's `block_sparse_moe.gate`, Qwen-MoE's `mlp.gate`, a shared expert's gate.
_ROUTER = re.compile(
    r"(^|\.)((block_sparse_moe|mlp|moe|feed_forward)\.(gate|router)|shared_expert_gate)(\.|$)"
)


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; valid roles: {', '.join(ROLES)}")
    return role


def classify(name: str, ndim: int, overrides: Mapping[str, str] | None = None) -> str:
    """Role of tensor ``name`` with ``ndim`` dimensions.

    ``overrides`` maps regexes to roles; the first whose ``re.search`` matches wins (in mapping
    order) before any built-in rule. Override roles are validated even when they do not match,
    so a typo in a recipe fails early.
    """
    if overrides:
        for role in overrides.values():
            _check_role(role)
        for pattern, role in overrides.items():
            if re.search(pattern, name):
                return role
    if _NORM.search(name):
        return "norm"
    if ndim < 2:
        return "other"  # biases, scalars: stored exactly
    if _EMBED.search(name):
        return "embed"
    if _HEAD.search(name):
        return "head"
    if any(p.search(name) for p in _ATTN):
        return "attn"
    if _EXPERT.search(name):
        return "expert"
    if _ROUTER.search(name):
        return "router"
    if any(p.search(name) for p in _MLP):
        return "mlp"
    return "other"
