"""How much of a skill an exported adapter keeps, on held-out data.

Three models are compared on the same texts, one after the other in one copy of the base (never
two models in memory): the base, the graft (base ⊕ the packs, as graftbuild fuses them), and the
base with the exported adapter loaded by PEFT (plus its base-variant patch, when it has one).

- A causal LM is judged by its held-out loss: ``kept = (L_base − L_adapter) / (L_base − L_graft)``,
  the share of the skill's loss improvement the adapter keeps.
- Any other model (an encoder) by its mean-pooled last hidden states h: ``kept = 1 − mean‖h_adapter
  − h_graft‖ / mean‖h_base − h_graft‖``, the share of the skill's change of the output it keeps.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from graftbuild.errors import UserError

if TYPE_CHECKING:
    import torch

    from graftbuild.release.adapter_base import Layout

SEQ_LEN = 64


def load_model(base: Path, layout: Layout) -> Any:
    """The base model as its own architecture (safetensors only, no remote code)."""
    from transformers import AutoConfig

    from graftbuild.release.adapter_base import model_class
    from graftbuild.weights.modeling import load_causal_lm

    if layout.causal:
        return load_causal_lm(base).eval()
    config = AutoConfig.from_pretrained(str(base), local_files_only=True, trust_remote_code=False)
    cls = model_class(config)
    return cls.from_pretrained(
        str(base), local_files_only=True, trust_remote_code=False, use_safetensors=True
    ).eval()


def _texts(data: Path, samples: int) -> list[str]:
    from graftbuild.weights.textdata import read_examples, read_pairs

    pairs = read_pairs(data)
    texts = [p + r for p, r in pairs] if pairs is not None else read_examples(data)
    return texts[:samples]


def _metric(model: Any, tok: Any, texts: list[str], causal: bool, data: Path) -> torch.Tensor:
    """A 0-d loss (causal) or [n, hidden] pooled hidden states."""
    import torch

    from graftbuild.runtime.grafted import chunk_loss
    from graftbuild.weights.textdata import token_chunks

    if causal:
        return torch.tensor(chunk_loss(model, token_chunks(tok, texts, SEQ_LEN, data)))
    rows = []
    with torch.no_grad():
        for text in texts:
            enc = tok(text, return_tensors="pt", truncation=True, max_length=SEQ_LEN)
            out = model(**enc, output_hidden_states=True)
            rows.append(out.hidden_states[-1][0].float().mean(dim=0))
    return torch.stack(rows)


def _apply(
    model: Any,
    layers: list[tuple[Path, float]],
    sign: float,
    base: Path,
    sources: list[Path | None],
) -> None:
    import torch

    from graftbuild.skillpack import PackReader

    params = dict(model.state_dict(keep_vars=True))
    with torch.no_grad():
        for (path, weight), source in zip(layers, sources, strict=True):
            with PackReader(path, base, source) as reader:
                for name in reader.names():
                    p = params[name]
                    p.copy_((p.float() + sign * weight * reader.decode(name)).to(p.dtype))


def kept_share(base: torch.Tensor, graft: torch.Tensor, other: torch.Tensor, causal: bool) -> float:
    if causal:
        gain = float(base - graft)
        return float(base - other) / gain if gain != 0 else float("nan")
    change = float((base - graft).norm(dim=-1).mean())
    miss = float((other - graft).norm(dim=-1).mean())
    return 1.0 - miss / change if change != 0 else float("nan")


def measure(
    base: Path,
    layers: list[tuple[Path, float]],
    adapter: Path,
    layout: Layout,
    data: Path,
    samples: int = 64,
    sources: list[Path | None] | None = None,
) -> dict[str, Any]:
    """The quality card's numbers (see the module docstring)."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from graftbuild.release.adapter_base import BASE_VARIANT, apply_base_variant

    texts = _texts(data, samples)
    tok = AutoTokenizer.from_pretrained(str(base), local_files_only=True, trust_remote_code=False)
    model = load_model(base, layout)
    causal = layout.causal
    try:
        with torch.no_grad():
            at_base = _metric(model, tok, texts, causal, data)
            srcs = list(sources) if sources is not None else [None] * len(layers)
            _apply(model, layers, 1.0, base, srcs)
            at_graft = _metric(model, tok, texts, causal, data)
            _apply(model, layers, -1.0, base, srcs)
            wrapped = PeftModel.from_pretrained(
                model, str(adapter), local_files_only=True, trust_remote_code=False
            ).eval()
            at_adapter = _metric(wrapped, tok, texts, causal, data)
            patched = None
            if (adapter / BASE_VARIANT).is_file():
                apply_base_variant(wrapped.get_base_model(), adapter)
                patched = _metric(wrapped, tok, texts, causal, data)
    except UserError as e:
        return {"data": data.name, "error": str(e)}
    out: dict[str, Any] = {
        "data": data.name,
        "texts": len(texts),
        "metric": "held-out loss" if causal else "mean-pooled last hidden state",
        "kept": round(kept_share(at_base, at_graft, at_adapter, causal), 4),
    }
    if causal:
        out |= {
            "loss_base": round(float(at_base), 5),
            "loss_graft": round(float(at_graft), 5),
            "loss_adapter": round(float(at_adapter), 5),
        }
    if patched is not None:
        out["kept_with_base_variant"] = round(kept_share(at_base, at_graft, patched, causal), 4)
        if causal:
            out["loss_adapter_with_base_variant"] = round(float(patched), 5)
    return out
