"""Serving targets of an exported adapter: what each multi-adapter server accepts.

A target says which parts of a pack its adapters can carry: LoRA on linear layers (which
ones), LoRA on embedding and output-head modules, ``modules_to_save`` (full copies of small
modules: norms), ``lora_bias`` (a bias delta inside LoRA), and the largest rank. What a target
cannot carry is an *extra*: written into a base-variant patch beside the adapter, refused, or
dropped on request (``graftbuild export peft --extras``), never silently.

The server rules, and where they come from:

- ``peft``: PEFT itself (``PeftModel.from_pretrained``, ``load_adapter``): LoRA on any
  ``nn.Linear`` and ``nn.Embedding``, ``modules_to_save``, ``lora_bias`` (PEFT >= 0.14; PEFT
  refuses ``lora_bias`` together with LoRA on an embedding, so the export then saves the
  embedding as a module instead), per-module ranks (``rank_pattern``), no rank cap.
- ``vllm``: vLLM's ``PEFTHelper`` refuses ``modules_to_save`` and ``bias != "none"`` (without
  ``bias_enabled``, gone from recent releases), and ranks above ``--max-lora-rank`` (which
  tops out at 512); its scaling is ``lora_alpha / r`` for every module (``rank_pattern`` and
  ``alpha_pattern`` are ignored), so the export writes ``lora_alpha = r`` and per-module
  factors whose scale is already 1. LoRA layers exist for every linear layer and for the
  ``embed_tokens`` / ``lm_head`` embedding modules of the model classes that implement
  ``SupportsLoRA`` (vllm/lora/utils.py ``get_supported_lora_modules``); vLLM's BERT embedding
  models do not, so encoders are refused.
- ``lorax``: LoRAX loads PEFT LoRA adapters for the attention and MLP projections and
  ``lm_head`` of its decoder models; no embedding LoRA, no ``modules_to_save``; no rank limit
  is enforced beyond ``--max-rank`` (default 64). Its rule table here follows LoRAX's
  documentation and has not been checked against a running server.
"""

from __future__ import annotations

from dataclasses import dataclass

from graftbuild.errors import UserError

# Decoder families whose vLLM model class implements SupportsLoRA (HF ``model_type``).
VLLM_MODEL_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi3",
        "granite",
        "olmo2",
        "starcoder2",
        "gpt_bigcode",
        "internlm2",
        "deepseek_v2",
        "deepseek_v3",
        "exaone",
        "nemotron",
    }
)
LORAX_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "gemma", "gemma2", "phi3"})
LORAX_LINEARS = frozenset(
    {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "qkv_proj",
        "gate_up_proj",
        "lm_head",
    }
)


@dataclass(frozen=True)
class Target:
    name: str
    modules_to_save: bool
    """Full copies of small modules (norms) in the adapter."""
    lora_bias: bool
    """Bias deltas of LoRA layers inside the adapter (``lora_B.bias``)."""
    embedding_lora: bool
    head_lora: bool
    default_rank: int | None
    """The rank cap when ``--max-rank`` is not given (None: no cap)."""
    rank_limit: int | None
    """The largest rank the server accepts at all."""
    model_types: frozenset[str] | None
    """HF model types the server serves LoRA on (None: any)."""
    linears: frozenset[str] | None
    """Linear modules (last name component) it takes LoRA on (None: every linear layer)."""

    def rules(self, max_rank: int | None) -> str:
        """The rules in one line, for the card and messages."""
        parts = [
            "modules_to_save allowed" if self.modules_to_save else "no modules_to_save",
            "lora_bias allowed" if self.lora_bias else "no bias",
            "LoRA on embeddings" if self.embedding_lora else "no embedding LoRA",
            "LoRA on the head" if self.head_lora else "no head LoRA",
            f"rank <= {max_rank}" if max_rank else "any rank",
        ]
        if self.linears is not None:
            parts.append("linear modules: " + ", ".join(sorted(self.linears)))
        return "; ".join(parts)

    def cap(self, max_rank: int | None) -> int | None:
        """The rank cap for ``--max-rank`` (a user error beyond the server's limit)."""
        cap = max_rank if max_rank is not None else self.default_rank
        if cap is not None and cap < 1:
            raise UserError(f"--max-rank: expected a positive rank, got {cap}")
        if cap is not None and self.rank_limit is not None and cap > self.rank_limit:
            raise UserError(
                f"--max-rank {cap}: {self.name} serves LoRA ranks up to {self.rank_limit}"
            )
        return cap


TARGETS: dict[str, Target] = {
    "peft": Target("peft", True, True, True, True, None, None, None, None),
    "vllm": Target("vllm", False, False, True, True, 64, 512, VLLM_MODEL_TYPES, None),
    "lorax": Target("lorax", False, False, False, True, 64, None, LORAX_MODEL_TYPES, LORAX_LINEARS),
}
EXTRAS = ("patch", "refuse", "drop")
"""What to do with deltas the target cannot carry: a base-variant patch file, exit 2, or
leave them out (recorded in the card with the measured cost)."""


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise UserError(f"--target {name!r}: expected one of {', '.join(TARGETS)}") from None
