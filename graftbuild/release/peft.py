"""A SkillPack as a complete PEFT LoRA adapter, shaped for a serving target.

Every tensor of the pack goes somewhere, never silently nowhere (``ExportReport`` says where):

- linear weights stored low-rank (``lowrank``, ``mixed``) become LoRA factors from their codec
  (``codec.lora_factors``); other 2-D deltas of linear layers (stored exactly) and the pruned
  embedding and head deltas are decoded and factored by SVD at the smallest rank whose
  relative Frobenius error is at most ``tolerance`` (LoRA on ``nn.Embedding`` and on the
  output head, both of which PEFT supports);
- a rank above the target's cap is re-factored to the cap by an SVD of the factors (through
  two QR decompositions, never the dense matrix) and the error it costs is reported per module;
  ``max_error`` turns a cap that costs more into exit 2 naming the modules;
- bias deltas of linear layers become ``lora_bias`` where the target allows it; norms and other
  small tensors become ``modules_to_save`` (the module's full values, base + delta) where the
  target allows it;
- what the target cannot carry (``graftbuild.release.targets``) is an *extra*: by default
  written to ``base_variant.safetensors`` beside the adapter (deltas to add to the base before
  serving; ``apply_base_variant``), or refused (exit 2) or dropped on request.

Several packs can be exported as one adapter (a continual chain, ``layers``): factors are
concatenated, each scaled by its pack's weight. ``task_type`` comes from the base's
architecture. PEFT's scaling is 1 for every module (``lora_alpha = r``, with ``alpha_pattern``
matching ``rank_pattern``); vLLM, which uses ``lora_alpha / r`` for all modules, gets the same 1.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graftbuild.errors import UserError
from graftbuild.release.adapter_base import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BASE_VARIANT,
    DEFAULT_TOLERANCE,
    PREFIX,
    REPORT_FILE,
    ExportReport,
    Layout,
    guess_layout,
    read_layout,
)
from graftbuild.release.adapter_base import (
    apply_base_variant as apply_base_variant,  # re-exported: the documented entry point
)
from graftbuild.release.targets import EXTRAS, Target, get_target

if TYPE_CHECKING:
    import torch


# -- factors ------------------------------------------------------------------------------------


def svd_rank(s: torch.Tensor, tolerance: float, cap: int | None) -> tuple[int, float]:
    """The smallest rank whose relative Frobenius error is at most ``tolerance`` (at most
    ``cap``), and that error."""
    import torch

    energy = s.double().pow(2)
    total = float(energy.sum())
    if total == 0.0:
        return 0, 0.0
    tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])  # tail[k] = sum_{i>=k}
    tail = torch.cat([tail, torch.zeros(1, dtype=tail.dtype)])
    rel = (tail / total).clamp(min=0).sqrt()
    ok = (rel <= tolerance).nonzero()
    k = int(ok[0]) if len(ok) else len(s)
    k = max(k, 1)
    if cap is not None:
        k = min(k, cap)
    return k, float(rel[k])


def factor_dense(
    delta: torch.Tensor, tolerance: float, cap: int | None
) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(lora_A [k, n], lora_B [m, k], error) of a dense delta by SVD; None if it is zero.

    The SVD goes through the Gram matrix of the smaller side (n × n for a tall embedding or
    head), so a 128k-row embedding needs its own float32 copy and an n × n float64 matrix, not
    a float64 copy and its m × n left factor."""

    tall = delta.shape[0] >= delta.shape[1]
    x = delta.float() if tall else delta.float().T  # [big, small]
    s, v = _gram_svd(x)
    k, err = svd_rank(s, tolerance, cap)
    if k == 0:
        return None
    vk = v[:, :k]  # [small, k], orthonormal
    left = (x.double() @ vk).float().contiguous()  # [big, k] = U_k Σ_k
    right = vk.T.float().contiguous()  # [k, small]
    if tall:
        return right, left, err
    return left.T.contiguous(), right.T.contiguous(), err


def _gram_svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (descending) and right singular vectors of x [big, small], from the
    eigendecomposition of xᵀx in float64."""
    import torch

    gram = x.T.double() @ x.double()
    evals, evecs = torch.linalg.eigh(gram)
    order = torch.argsort(evals, descending=True)
    return evals[order].clamp(min=0).sqrt(), evecs[:, order]


def refactor(
    a: torch.Tensor, b: torch.Tensor, tolerance: float, cap: int | None
) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """B·A re-factored by SVD at the rank ``tolerance`` and ``cap`` allow, through QR of each
    factor (the m × n product is never formed)."""
    import torch

    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    k, err = svd_rank(s, tolerance, cap)
    if k == 0:
        return None
    new_b = (qb @ (u[:, :k] * s[:k])).float().contiguous()
    new_a = (vh[:k] @ qa.T).float().contiguous()
    return new_a, new_b, err


def _codec_factors(reader: Any, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The codec's own LoRA factors of a linear weight, or None when it has none."""
    from graftbuild.compress.codecs import get_codec

    entry = reader.entries[name]
    if entry.get("meta", {}).get("fallback") == "exact" or entry["role"] in ("embed", "head"):
        return None
    got = get_codec(entry["codec"]).lora_factors(reader, name, entry)
    return None if isinstance(got, str) else got


# -- the export ----------------------------------------------------------------------------------


@dataclass
class _Plan:
    lora: dict[str, str] = field(default_factory=dict)
    """LoRA module -> "linear" | "embedding"."""
    biases: dict[str, str] = field(default_factory=dict)
    """Module -> its bias tensor name (for lora_bias)."""
    saved: dict[str, list[str]] = field(default_factory=dict)
    """Module -> pack tensors of it, written whole (modules_to_save)."""
    extras: dict[str, str] = field(default_factory=dict)
    """Pack tensor -> why the target cannot carry it."""
    tokens: dict[str, list[int]] = field(default_factory=dict)
    """Embedding -> the rows its delta changes, stored as trainable tokens (PEFT)."""
    transposed: set[str] = field(default_factory=set)
    """Conv1D modules: their delta is [in, out]; PEFT's factors are those of its transpose."""


def _plan(names: dict[str, tuple[str, int]], layout: Layout, target: Target) -> _Plan:
    plan = _Plan()
    for name, (_role, ndim) in sorted(names.items()):
        module, param = name.rsplit(".", 1) if "." in name else ("", name)
        kind = layout.kinds.get(module)
        if kind is None and layout.known:
            plan.extras[name] = "not a module of the base model"
        elif param == "weight" and ndim == 2 and kind in ("linear", "conv1d", "embedding"):
            if kind == "conv1d":  # GPT-2's Conv1D stores the weight [in, out]
                plan.transposed.add(module)
            why = _lora_refusal(module, kind, layout, target)
            if why is None:
                plan.lora[module] = kind
            else:
                plan.extras[name] = why
        elif param == "bias" and kind in ("linear", "conv1d"):
            if target.lora_bias:
                plan.biases[module] = name
            else:
                plan.extras[name] = f"a bias delta; {target.name} serves no adapter bias"
        elif target.modules_to_save and layout.known:
            plan.saved.setdefault(module, []).append(name)
        elif target.modules_to_save:
            plan.extras[name] = "modules_to_save needs the base model (--base)"
        else:
            plan.extras[name] = f"{kind or 'a'} tensor; {target.name} takes no modules_to_save"
    # A module with a bias delta but no weight delta still needs LoRA factors (rank 1, zero).
    for module in plan.biases:
        plan.lora.setdefault(module, "linear")
        if layout.kinds.get(module) == "conv1d":
            plan.transposed.add(module)
    # A tied head with no tensor of its own in the pack (checkpoints store the tied weight
    # once): the embedding's delta is the head's too. (A pack that has both unties them, as
    # transformers does when a checkpoint holds two different values.)
    if layout.tied_head and layout.embedding in plan.lora and layout.head not in plan.lora:
        if target.head_lora:
            plan.lora[layout.head] = "tied"  # type: ignore[index]
        else:
            plan.extras[f"{layout.head}.weight"] = f"tied head; {target.name} takes no head LoRA"
    # PEFT refuses lora_bias with LoRA on an embedding: such embeddings are stored as their
    # changed rows (trainable tokens), or whole when the head is tied to them.
    if plan.biases:
        for module, kind in list(plan.lora.items()):
            if kind == "embedding" and layout.tied_head:
                del plan.lora[module]
                plan.saved[module] = [f"{module}.weight"]
            elif kind == "embedding":
                plan.lora[module] = "tokens"
    # A saved module must not also be a LoRA module.
    for module in list(plan.saved):
        if module in plan.lora:
            for t in plan.saved.pop(module):
                plan.extras[t] = "a module that is also a LoRA module"
    return plan


def _lora_refusal(module: str, kind: str, layout: Layout, target: Target) -> str | None:
    """Why ``target`` takes no LoRA on ``module``, or None."""
    if kind == "embedding":
        return None if target.embedding_lora else f"{target.name} takes no LoRA on embeddings"
    if module == layout.head:
        return None if target.head_lora else f"{target.name} takes no LoRA on the head"
    last = module.rsplit(".", 1)[-1]
    if target.linears is not None and last not in target.linears:
        return f"{target.name} takes LoRA on {', '.join(sorted(target.linears))}, not {last}"
    return None


def export_adapter(
    layers: list[tuple[Path, float]],
    out: Path,
    *,
    base: Path | None = None,
    target: str = "peft",
    max_rank: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    max_error: float | None = None,
    extras: str = "patch",
    dtype: str = "float32",
    base_model: str | None = None,
    data: Path | None = None,
    samples: int = 64,
    provenance: dict[str, Any] | None = None,
    sources: list[Path | None] | None = None,
) -> ExportReport:
    """Write the adapter of ``layers`` (pack files and their weights, root of a chain first)
    into ``out``; see the module docstring. ``data``: held-out text for the quality card.
    ``sources``: each layer's source folder, which a reference pack (a lossless pack that names
    its source's weights) reads its deltas from, with ``base``."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise UserError(
            "exporting a PEFT adapter needs the `peft` package: pip install 'graftbuild[peft]'"
        ) from None
    import torch
    from safetensors.torch import save_file

    from graftbuild.skillpack import PackReader
    from graftbuild.weights.modeling import torch_dtype

    spec = get_target(target)
    _prepare_out(out)
    if extras not in EXTRAS:
        raise UserError(f"--extras {extras!r}: expected one of {', '.join(EXTRAS)}")
    if not 0 <= tolerance < 1:
        raise UserError(f"--tolerance {tolerance}: expected a relative error in [0, 1)")
    cap = spec.cap(max_rank)
    out_dtype = torch_dtype(dtype)
    srcs = list(sources) if sources is not None else [None] * len(layers)
    readers = [PackReader(p, base, s) for (p, _), s in zip(layers, srcs, strict=True)]
    try:
        for (path, _), r in zip(layers, readers, strict=True):
            added = (r.header.get("vocab") or {}).get("tokens") or []
            if added:
                raise UserError(
                    f"{path}: the pack adds tokens "
                    f"({', '.join(repr(t['content']) for t in added[:5])}); a LoRA adapter cannot "
                    "add vocabulary rows: fuse the pack into a model instead"
                )
        bases = {str(r.header.get("base", "")) for r in readers}
        if len(bases) > 1:
            raise UserError(f"{layers[0][0]}: the packs of one adapter have different bases")
        roles: dict[str, tuple[str, int]] = {}
        for r in readers:
            for n in r.names():
                roles.setdefault(n, (r.entries[n]["role"], len(r.entries[n]["shape"])))
        layout = read_layout(base) if base is not None else guess_layout(roles)
        where = str(layers[-1][0])
        if spec.model_types is not None:
            if not layout.known:
                raise UserError(f"{where}: --target {target} needs the base model (--base)")
            if layout.model_type not in spec.model_types:
                raise UserError(
                    f"{where}: {target} serves no LoRA adapter on {layout.architecture} "
                    f"(model type {layout.model_type!r}); --target peft writes one for PEFT"
                )
        plan = _plan(roles, layout, spec)
        if plan.extras and extras == "refuse":
            raise UserError(
                f"{where}: --target {target} cannot carry {len(plan.extras)} tensors "
                f"(--extras refuse): " + "; ".join(f"{t}: {w}" for t, w in plan.extras.items())
            )

        def delta(name: str) -> torch.Tensor | None:
            total = None
            for (_, w), r in zip(layers, readers, strict=True):
                if name in r.entries:
                    d = r.decode(name).float() * w
                    total = d if total is None else total + d
            return total

        report = ExportReport(
            target=target, task_type=layout.task_type, max_rank=cap, tolerance=tolerance
        )
        tensors: dict[str, torch.Tensor] = {}
        over: dict[str, float] = {}
        tokens: dict[str, list[int]] = {}
        for module, kind in sorted(plan.lora.items()):
            weight = f"{layout.embedding}.weight" if kind == "tied" else f"{module}.weight"
            if kind == "tokens" or (
                kind == "embedding"
                and spec.modules_to_save
                and layout.known
                and not layout.tied_head
            ):
                d = delta(weight)
                rows = _token_rows(d, kind == "tokens", tolerance, cap)
                if rows is not None:
                    tensors |= _token_values(module, weight, rows, d, base)  # type: ignore[arg-type]
                    tokens[module] = rows
                    continue
            got = _module_factors(weight, layers, readers, delta, tolerance, cap)
            if got is None and module not in plan.biases:
                continue  # a zero delta: nothing to add
            if got is None:
                bias = delta(plan.biases[module])
                assert bias is not None
                fan_in = _in_features(module, readers, bias, module in plan.transposed)
                lora_a = torch.zeros(1, fan_in)
                lora_b, err, how = torch.zeros(bias.numel(), 1), 0.0, "bias only"
            else:
                lora_a, lora_b, err, how = got
                if module in plan.transposed:  # Δ = B·A is [in, out]: PEFT wants Δᵀ = Aᵀ·Bᵀ
                    lora_a, lora_b = lora_b.T.contiguous(), lora_a.T.contiguous()
            if kind == "tied":
                how = f"tied to {layout.embedding}: {how}"
            if max_error is not None and err > max_error:
                over[module] = err
            key = PREFIX + module
            if kind == "embedding":
                tensors[f"{key}.lora_embedding_A"] = lora_b.T.contiguous().to(out_dtype)
                tensors[f"{key}.lora_embedding_B"] = lora_a.T.contiguous().to(out_dtype)
            else:
                tensors[f"{key}.lora_A.weight"] = lora_a.to(out_dtype)
                tensors[f"{key}.lora_B.weight"] = lora_b.to(out_dtype)
            if module in plan.biases:
                bias = delta(plan.biases[module])
                assert bias is not None
                tensors[f"{key}.lora_B.bias"] = bias.to(out_dtype)
                report.biases.append(module)
            report.modules[module] = int(lora_a.shape[0])
            report.errors[module], report.how[module] = err, how
        if over:
            raise UserError(
                f"{where}: --target {target} at rank <= {cap} costs more than "
                f"--max-error {max_error} on {len(over)} modules: "
                + ", ".join(f"{m} ({e:.3f})" for m, e in sorted(over.items()))
            )
        report.tokens = {m: len(r) for m, r in tokens.items()}
        plan.tokens = tokens
        if plan.saved:
            assert base is not None
            tensors |= _saved_modules(plan.saved, layout, base, delta)
            report.saved = sorted(plan.saved)
        if not tensors:
            raise UserError(f"{where}: nothing to export: the pack's deltas are all zero")

        out.mkdir(parents=True, exist_ok=True)
        for name in OWN_FILES:
            (out / name).unlink(missing_ok=True)
        _write_config(out, report, plan, spec, base_model)
        meta = {"format": "pt", "graftbuild.base": next(iter(bases))}
        save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata=meta)
        report.adapter_bytes = (out / ADAPTER_WEIGHTS).stat().st_size
        if plan.extras:
            if extras == "patch":
                patch = {}
                for t in sorted(plan.extras):
                    d = delta(t)
                    if d is not None:
                        patch[t] = d.contiguous()
                    report.base_variant[t] = plan.extras[t]
                if patch:
                    save_file(patch, str(out / BASE_VARIANT), metadata=meta)
            else:
                report.left_out = dict(plan.extras)
    finally:
        for r in readers:
            r.close()
    if data is not None and base is not None:
        from graftbuild.release.adapter_quality import measure

        report.quality = measure(base, layers, out, layout, data, samples, srcs)
    from graftbuild.release.adapter_card import write_card

    (out / REPORT_FILE).write_text(json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n")
    write_card(out, report, spec, layers, provenance or {}, layout, base_model)
    return report


OWN_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_VARIANT, REPORT_FILE, "README.md")


def _prepare_out(out: Path) -> None:
    """An export folder must be new, empty, or an earlier export (whose files are replaced once
    the new export is ready to be written, so no stale base variant survives a re-export)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    entries = {p.name for p in out.iterdir()}
    if entries and REPORT_FILE not in entries:
        raise UserError(f"{out}: not empty and not a graftbuild export; choose another folder")


def _token_rows(
    d: torch.Tensor | None, forced: bool, tolerance: float, cap: int | None
) -> list[int] | None:
    """The rows an embedding delta changes, when PEFT's trainable tokens (those rows' values,
    exact) are forced or take fewer bytes than LoRA at the rank ``tolerance`` needs; else None."""

    if d is None:
        return None
    rows = (d != 0).any(dim=1).nonzero().squeeze(1)
    if len(rows) == 0:
        return None
    if not forced:
        s, _ = _gram_svd(d if d.shape[0] >= d.shape[1] else d.T)
        k, _ = svd_rank(s, tolerance, cap)
        if k == 0 or k * (d.shape[0] + d.shape[1]) < len(rows) * d.shape[1]:
            return None
    return [int(i) for i in rows]


def _token_values(
    module: str, weight: str, rows: list[int], d: torch.Tensor, base: Path
) -> dict[str, torch.Tensor]:
    """``trainable_tokens_delta``: the new values (base + delta) of the changed rows."""
    import torch

    from graftbuild.weights.tensors import ModelWeights

    index = torch.tensor(rows, dtype=torch.long)
    with ModelWeights(base) as weights:
        w = weights.get(weight)
        values = (w[index].float() + d[index]).to(w.dtype).contiguous()
    return {f"{PREFIX}{module}.token_adapter.trainable_tokens_delta": values}


def _in_features(
    module: str, readers: list[Any], bias: torch.Tensor, transposed: bool = False
) -> int:
    for r in readers:
        entry = r.entries.get(f"{module}.weight")
        if entry is not None:
            return int(entry["shape"][0 if transposed else 1])
    return int(bias.numel())  # unknown; PEFT checks the shape on load


def _module_factors(
    weight: str,
    layers: list[tuple[Path, float]],
    readers: list[Any],
    delta: Any,
    tolerance: float,
    cap: int | None,
) -> tuple[torch.Tensor, torch.Tensor, float, str] | None:
    """(lora_A, lora_B, error, how) of one module's summed delta, or None if it is zero."""
    import torch

    present = [(w, r) for (_, w), r in zip(layers, readers, strict=True) if weight in r.entries]
    if not present:
        return None
    factors = [_codec_factors(r, weight) for _, r in present]
    if any(f is None for f in factors):
        d = delta(weight)
        got = factor_dense(d, tolerance, cap)
        if got is None:
            return None
        a, b, err = got
        return a, b, err, f"SVD of the decoded delta (rank {a.shape[0]})"
    a = torch.cat([f[0] for f in factors])  # type: ignore[index]
    b = torch.cat([f[1] * w for f, (w, _) in zip(factors, present, strict=True)], dim=1)  # type: ignore[index]
    rank = a.shape[0]
    if (cap is not None and rank > cap) or len(present) > 1:
        got = refactor(a, b, 0.0 if cap is None or rank <= cap else tolerance, cap)
        if got is None:
            return None
        new_a, new_b, err = got
        how = f"pack factors (rank {rank}) re-factored to rank {new_a.shape[0]}"
        return new_a, new_b, err, how
    return a, b, 0.0, f"pack factors (rank {rank})"


def _saved_modules(
    saved: dict[str, list[str]], layout: Layout, base: Path, delta: Any
) -> dict[str, torch.Tensor]:
    """Full values (base + delta) of every parameter of each saved module."""
    from graftbuild.weights.tensors import ModelWeights

    out = {}
    with ModelWeights(base) as weights:
        for module in sorted(saved):
            for param in layout.params.get(module, []):
                name = f"{module}.{param}"
                if name not in weights:
                    raise UserError(f"{base}: tensor {name!r} is not in the base model's weights")
                value = weights.get(name).float()
                d = delta(name)
                if d is not None:
                    value = value + d
                out[f"{PREFIX}{name}"] = value.to(weights.get(name).dtype).contiguous()
    return out


def _write_config(
    out: Path, report: ExportReport, plan: _Plan, spec: Target, base_model: str | None
) -> None:
    from peft import LoraConfig

    ranks = report.modules or {}
    top = max(ranks.values()) if ranks else 1
    patterns = {re.escape(m): r for m, r in ranks.items() if r != top}
    config = LoraConfig(
        r=top,
        lora_alpha=top,
        target_modules=sorted(ranks) or None,
        rank_pattern=patterns,
        alpha_pattern=dict(patterns),
        lora_dropout=0.0,
        fan_in_fan_out=bool(plan.transposed),
        inference_mode=True,
        bias="none",
        lora_bias=bool(report.biases),
        modules_to_save=sorted(plan.saved) or None,
        trainable_token_indices=dict(sorted(plan.tokens.items())) or None,
        task_type=report.task_type,
        base_model_name_or_path=base_model,
    )
    config.save_pretrained(str(out))


def export_peft(pack_file: Path, out: Path, base_model: str | None = None) -> ExportReport:
    """One pack to a PEFT adapter with the default settings (the pack's own factors; embedding,
    head and exact deltas by SVD; extras into a base-variant patch, as no base is given)."""
    return export_adapter([(pack_file, 1.0)], out, base_model=base_model)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (0 when both are zero)."""
    denom = float(b.double().norm())
    num = float((a.double() - b.double()).norm())
    return 0.0 if denom == 0 and num == 0 else (math.inf if denom == 0 else num / denom)
