"""A SkillPack's low-rank parts as a PEFT LoRA adapter (``adapter_config.json`` +
``adapter_model.safetensors``), loadable by ``peft.PeftModel.from_pretrained``.

Per module the codec gives the factors (``codec.lora_factors``): ``lowrank`` codes give
``lora_B = a`` (m × k) and ``lora_A = b`` (k × n) directly; ``mixed`` codes are decoded
(dequantised) and re-factored by SVD at their stored rank, which is exact up to float rounding
since the decoded delta has that rank. Each module keeps its own rank
(``rank_pattern``) with ``lora_alpha = r`` so PEFT's scaling is 1. Everything else (pruned
embedding and head deltas, norms, biases, matrices stored exactly) cannot be a LoRA factor pair
and is left out; ``ExportReport.left_out`` says which and why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graftbuild.errors import UserError

if TYPE_CHECKING:
    import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class ExportReport:
    modules: dict[str, int] = field(default_factory=dict)
    """Exported module name -> LoRA rank."""
    left_out: dict[str, str] = field(default_factory=dict)
    """Pack tensor name -> why it is not in the adapter."""


def lora_factors(reader: Any, name: str) -> tuple[torch.Tensor, torch.Tensor] | str:
    """``(lora_A [k, n], lora_B [m, k])`` of a pack tensor, or why it has none. Which tensors
    LoRA can express is decided here (linear weights outside the embedding and head); how to
    factor one is its codec's (``codec.lora_factors``)."""
    from graftbuild.compress.codecs import get_codec

    entry = reader.entries[name]
    codec, meta = entry["codec"], entry.get("meta", {})
    if len(entry["shape"]) != 2 or not name.endswith(".weight"):
        return "not a linear weight (norm, bias or other vector): LoRA cannot express it"
    if entry["role"] in ("embed", "head"):
        return f"{entry['role']} delta ({codec}): not low-rank, LoRA cannot express it"
    if meta.get("fallback") == "exact":
        return f"stored with {codec} (not low-rank): LoRA cannot express it at low rank"
    return get_codec(codec).lora_factors(reader, name, entry)


def export_peft(pack_file: Path, out: Path, base_model: str | None = None) -> ExportReport:
    try:
        from peft import LoraConfig
    except ImportError:
        raise UserError(
            "exporting a PEFT adapter needs the `peft` package: pip install 'graftbuild[peft]'"
        ) from None
    from safetensors.torch import save_file

    from graftbuild.skillpack import PackReader

    report = ExportReport()
    tensors: dict[str, torch.Tensor] = {}
    with PackReader(pack_file) as reader:
        added = (reader.header.get("vocab") or {}).get("tokens") or []
        if added:
            raise UserError(
                f"{pack_file}: the pack adds tokens "
                f"({', '.join(repr(t['content']) for t in added[:5])}); a LoRA adapter cannot "
                "add vocabulary rows: fuse the pack into a model instead"
            )
        for name in reader.names():
            if reader.entries[name]["codec"] == "zero":
                continue  # the fine-tune left it as it was: nothing to adapt
            got = lora_factors(reader, name)
            if isinstance(got, str):
                report.left_out[name] = got
                continue
            lora_a, lora_b = got
            module = name.removesuffix(".weight")
            tensors[f"base_model.model.{module}.lora_A.weight"] = lora_a
            tensors[f"base_model.model.{module}.lora_B.weight"] = lora_b
            report.modules[module] = int(lora_a.shape[0])
        header = dict(reader.header)
    if not report.modules:
        raise UserError(f"{pack_file}: no low-rank module in this pack; nothing to export")
    out.mkdir(parents=True, exist_ok=True)
    top = max(report.modules.values())
    patterns = {re.escape(m): r for m, r in report.modules.items()}
    config = LoraConfig(
        r=top,
        lora_alpha=top,
        target_modules=sorted(report.modules),
        rank_pattern=patterns,
        alpha_pattern=dict(patterns),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )
    config.save_pretrained(str(out))
    meta = {"format": "pt", "graftbuild.base": str(header.get("base", ""))}
    if header.get("parent"):
        meta["graftbuild.parent"] = str(header["parent"])
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata=meta)
    return report
