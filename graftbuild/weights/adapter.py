"""PEFT LoRA adapter folders as sources: the delta a saved, unmerged adapter adds to its base.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. For a module
``M`` with factors ``lora_A [r, in]`` and ``lora_B [out, r]`` the delta of ``M.weight`` is
``B·A·scale`` (transposed for ``fan_in_fan_out`` layers such as GPT-2's Conv1D), with
``scale = alpha / r`` (``alpha / √r`` under rsLoRA) and per-module ``rank_pattern`` /
``alpha_pattern`` as PEFT applies them; an embedding's ``lora_embedding_A [r, vocab]`` and
``lora_embedding_B [dim, r]`` give ``(B·A)ᵀ·scale``. Whole tensors the adapter saves
(``modules_to_save``, trained biases, an embedding's ``base_layer``) replace the base's: their
delta is tensor − base. Every other tensor's delta is zero. The factors are small and read once;
no merged model is ever built.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graftbuild.errors import UserError

if TYPE_CHECKING:
    import torch

    from graftbuild.weights.tensors import ModelWeights

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def is_adapter(folder: Path) -> bool:
    """A PEFT adapter folder (its config beside its weights), not a model folder."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule: a pattern applies to a module whose name ends with it (at a dot)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


class AdapterDeltas:
    """The deltas of a LoRA adapter folder against ``base``, tensor by tensor."""

    def __init__(self, folder: Path, base: ModelWeights) -> None:
        from graftbuild.weights.tensors import TensorFile

        self.folder = Path(folder)
        cfg_path = self.folder / ADAPTER_CONFIG
        try:
            cfg = json.loads(cfg_path.read_text())
            if not isinstance(cfg, dict):
                raise TypeError("not a JSON object")
        except (ValueError, TypeError) as e:
            raise UserError(f"{cfg_path}: not a valid adapter config ({e})") from None
        kind = cfg.get("peft_type", "LORA")
        if kind != "LORA":
            raise UserError(
                f"{cfg_path}: peft_type {kind!r}; graftbuild reads LoRA adapters (peft_type "
                "LORA) only. Merge the adapter into its base and give the merged folder"
            )
        if cfg.get("use_dora"):
            raise UserError(
                f"{cfg_path}: a DoRA adapter (use_dora) rescales whole weights, not a low-rank "
                "delta; merge it (merge_and_unload) and give the merged folder"
            )
        weights = self.folder / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise UserError(f"{self.folder}: adapter folder without {ADAPTER_WEIGHTS}")
        self.config = cfg
        r0 = int(cfg.get("r", 8))
        alpha0 = float(cfg.get("lora_alpha", r0))
        rslora = bool(cfg.get("use_rslora", False))
        fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        rank_pattern = cfg.get("rank_pattern") or {}
        alpha_pattern = cfg.get("alpha_pattern") or {}

        tf = TensorFile(weights)
        try:
            raw = {k: tf.read(k) for k in tf.infos}
        finally:
            tf.close()
        factors: dict[str, dict[str, torch.Tensor]] = {}
        self._whole: dict[str, torch.Tensor] = {}
        self._bias: dict[str, tuple[torch.Tensor, str]] = {}  # bias name -> (B.bias, module)
        for key, t in raw.items():
            name = key.removeprefix(_PREFIX)
            m = re.match(r"^(.*)\.(lora_A|lora_B)\.weight$", name) or re.match(
                r"^(.*)\.(lora_embedding_A|lora_embedding_B)$", name
            )
            if m:
                factors.setdefault(m.group(1), {})[m.group(2)] = t
                continue
            if ".lora_magnitude_vector" in name:
                raise UserError(f"{weights}: {key!r} is a DoRA magnitude; merge the adapter first")
            mb = re.match(r"^(.*)\.lora_B\.bias$", name)
            if mb:
                self._bias[f"{mb.group(1)}.bias"] = (t, mb.group(1))
                continue
            if ".lora_" in name:
                raise UserError(f"{weights}: tensor {key!r}: an adapter part not understood")
            # a whole tensor (modules_to_save, a trained bias, an embedding's base_layer)
            whole = re.sub(r"\.modules_to_save(\.default)?\.", ".", name)
            whole = whole.replace(".base_layer.", ".")
            self._whole[self._base_name(whole, base, key)] = t

        self._lora: dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]] = {}
        self.ranks: dict[str, int] = {}
        for module, parts in sorted(factors.items()):
            embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
            a_key, b_key = (
                ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
            )
            if a_key not in parts or b_key not in parts:
                raise UserError(f"{weights}: module {module!r} lacks {a_key} or {b_key}")
            a, b = parts[a_key], parts[b_key]
            if a.ndim != 2 or b.ndim != 2:
                raise UserError(
                    f"{weights}: module {module!r}: only linear and embedding LoRA layers are "
                    f"read (factors of shapes {list(a.shape)}, {list(b.shape)})"
                )
            rank = int(a.shape[0])
            r = int(_pattern_value(rank_pattern, module, r0))
            alpha = float(_pattern_value(alpha_pattern, module, alpha0))
            scale = alpha / (r**0.5) if rslora else alpha / r
            name = self._base_name(f"{module}.weight", base, module)
            # an embedding's delta is (B·A)ᵀ; so is a fan_in_fan_out (Conv1D) layer's
            transpose = embedding or fan_in_fan_out
            shape = base.infos[name].shape
            out_shape = (b.shape[0], a.shape[1])
            if (out_shape[::-1] if transpose else out_shape) != shape:
                raise UserError(
                    f"{weights}: module {module!r}: B·A is {list(out_shape)}"
                    f"{' (transposed)' if transpose else ''}, the base's {name!r} is "
                    f"{list(shape)}"
                )
            self._lora[name] = (a, b, scale, transpose)
            self.ranks[name] = rank
        for bias, (t, module) in list(self._bias.items()):
            name = self._base_name(bias, base, module)
            w = f"{name.removesuffix('.bias')}.weight"
            scale = self._lora[w][2] if w in self._lora else 1.0
            self._bias[name] = (t * scale, module)
            if name != bias:
                del self._bias[bias]
        both = sorted(set(self._whole) & (set(self._lora) | set(self._bias)))
        if both:
            raise UserError(f"{weights}: {both[0]!r} is both saved whole and adapted")

    def _base_name(self, name: str, base: ModelWeights, what: str) -> str:
        """The base's tensor that adapter key ``name`` refers to (PEFT names modules by their
        path in the model class it wrapped, which may add or drop a leading prefix)."""
        if name in base.infos:
            return name
        tails = [n for n in base.infos if n.endswith("." + name) or name.endswith("." + n)]
        if len(tails) == 1:
            return tails[0]
        raise UserError(
            f"{self.folder}: adapter tensor {what!r} matches no tensor of the base "
            f"({name!r} is not in {base.folder}); was the adapter trained on this base?"
        )

    def touched(self) -> set[str]:
        """Base tensor names the adapter changes (every other tensor's delta is zero)."""
        return set(self._lora) | set(self._whole) | set(self._bias)

    def delta(self, name: str, base: ModelWeights) -> torch.Tensor:
        """The float32 delta of base tensor ``name`` (zeros for a tensor the adapter leaves)."""
        import torch

        info = base.infos[name]
        if name in self._lora:
            a, b, scale, transpose = self._lora[name]
            d = (b.to(torch.float32) @ a.to(torch.float32)) * scale
            return (d.T if transpose else d).contiguous()
        if name in self._bias:
            return self._bias[name][0].to(torch.float32).reshape(info.shape).clone()
        if name in self._whole:
            t = self._whole[name]
            if tuple(t.shape) != info.shape:
                raise UserError(
                    f"{self.folder}: adapter tensor {name!r} is {list(t.shape)}, the base's is "
                    f"{list(info.shape)}"
                )
            return t.to(torch.float32) - base.get(name).to(torch.float32)
        return torch.zeros(info.shape, dtype=torch.float32)

    def rank(self, name: str) -> int | None:
        """The adapter's rank for ``name`` when its delta is a LoRA product, else None."""
        return self.ranks.get(name)

    def describe(self) -> str:
        return (
            f"LoRA adapter, {len(self._lora)} adapted modules (rank "
            f"{'/'.join(str(r) for r in sorted(set(self.ranks.values()))) or '-'}), "
            f"{len(self._whole)} whole tensors"
        )
