"""The README card of an exported adapter: what is in it, for which server, with its provenance
and the share of the skill it keeps (``adapter_quality``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from graftbuild.release.adapter_base import ExportReport, Layout
    from graftbuild.release.targets import Target

CARD = "README.md"


def _pct(x: Any) -> str:
    return "n/a" if x is None or x != x else f"{100 * float(x):.1f}%"


def write_card(
    out: Path,
    report: ExportReport,
    target: Target,
    layers: list[tuple[Path, float]],
    provenance: dict[str, Any],
    layout: Layout,
    base_model: str | None,
) -> None:
    from graftbuild.cache.hashing import hash_file
    from graftbuild.release.adapter_base import BASE_VARIANT
    from graftbuild.skillpack import PackReader
    from graftbuild.skillpack.format import PACK_FILE

    packs = provenance.get("packs") or [
        {
            "name": p.parent.name if p.name == PACK_FILE else p.stem,
            "hash": hash_file(p),
            "weight": w,
        }
        for p, w in layers
    ]
    with PackReader(layers[-1][0]) as r:
        base_hash = provenance.get("base") or str(r.header.get("base", ""))
    ranks = sorted(report.modules.values())
    front = ["---", "library_name: peft"]
    if base_model:
        front.append(f"base_model: {base_model}")
    front += ["tags:", "- graftbuild", "- lora", f"- {target.name}", "---", ""]
    lines = [
        *front,
        f"# LoRA adapter for {target.name}",
        "",
        "Exported by graftbuild from a SkillPack (a compressed fine-tuning delta).",
        "",
        "## Provenance",
        "",
        "| | |",
        "|---|---|",
        *[f"| pack `{p['name']}` | `{p['hash']}` (weight {p.get('weight', 1.0)}) |" for p in packs],
        f"| base model hash | `{base_hash}` |",
        f"| base architecture | {layout.architecture or 'unknown (no --base)'} |",
        f"| task_type | {report.task_type or 'none'} |",
        f"| target | {target.name}: {target.rules(report.max_rank)} |",
        "",
        "## Contents",
        "",
        f"- adapter weights: {report.adapter_bytes} bytes",
        f"- {len(ranks)} LoRA modules" + (f", rank {ranks[0]}–{ranks[-1]}" if ranks else ""),
        f"- modules_to_save: {len(report.saved)}",
        f"- embeddings as their changed rows (trainable tokens): "
        f"{', '.join(f'{m} ({n} rows)' for m, n in report.tokens.items()) or 'none'}",
        f"- bias deltas in lora_B.bias: {len(report.biases)}",
    ]
    if report.base_variant:
        lines.append(
            f"- **base variant**: {len(report.base_variant)} tensors the target cannot carry are "
            f"in `{BASE_VARIANT}`; add them to the base before serving "
            "(`graftbuild.release.peft.apply_base_variant(model, folder)`)"
        )
    if report.left_out:
        lines.append(
            f"- **left out on request** (`--extras drop`): {len(report.left_out)} tensors: "
            + ", ".join(sorted(report.left_out)[:8])
            + (" …" if len(report.left_out) > 8 else "")
        )
    worst = sorted(report.errors.items(), key=lambda kv: -kv[1])[:5]
    if worst and worst[0][1] > 0:
        lines += ["", "Largest factoring errors (relative Frobenius, against the pack's delta):"]
        lines.append("")
        lines += [f"- `{m}`: {e:.4f} at rank {report.modules[m]}" for m, e in worst if e > 0]
    lines += ["", "## Quality", ""]
    q = report.quality
    if q is None:
        lines.append(
            "Not measured (no held-out data: pass `--data`, or export from a recipe "
            "whose eval has a dataset named after the pack)."
        )
    elif "error" in q:
        lines.append(f"Not measured: {q['error']}")
    else:
        lines += [
            f"On `{q['data']}` ({q['texts']} texts, {q['metric']}), the share of the skill's "
            "improvement this adapter keeps against the graft (base ⊕ pack):",
            "",
            "| served as | kept |",
            "|---|---|",
            f"| adapter alone | {_pct(q['kept'])} |",
        ]
        if "kept_with_base_variant" in q:
            lines.append(f"| adapter + base variant | {_pct(q['kept_with_base_variant'])} |")
        if "loss_base" in q:
            lines += [
                "",
                f"Losses: base {q['loss_base']}, graft {q['loss_graft']}, "
                f"adapter {q['loss_adapter']}.",
            ]
    lines += [
        "",
        "## Loading",
        "",
        "```python",
        "from peft import PeftModel",
        "model = PeftModel.from_pretrained(base_model, 'THIS_FOLDER',",
        "                                  local_files_only=True, trust_remote_code=False)",
        "```",
        "",
    ]
    if target.name == "vllm":
        lines.append(
            "vLLM: `vllm serve BASE --enable-lora --lora-modules NAME=THIS_FOLDER "
            f"--max-lora-rank {max(ranks) if ranks else 16}`, "
            'then a request with `"model": "NAME"`.'
        )
    elif target.name == "lorax":
        lines.append(
            'LoRAX: a request with `"adapter_id": "THIS_FOLDER", "adapter_source": "local"`.'
        )
    else:
        lines.append(
            "This adapter follows PEFT's rules (it may hold modules_to_save, trainable tokens "
            "and lora_bias, which vLLM and LoRAX refuse); for those servers export with "
            "`--target vllm` or `--target lorax`."
        )
    lines.append("")
    (out / CARD).write_text("\n".join(lines))
