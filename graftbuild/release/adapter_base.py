"""What the adapter export's modules share: file names, the export report, the base model's
layout (module kinds, parameters, tied head, PEFT task type) and applying a base variant."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graftbuild.errors import UserError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
BASE_VARIANT = "base_variant.safetensors"
REPORT_FILE = "graftbuild-export.json"
DEFAULT_TOLERANCE = 1e-3
"""Relative Frobenius error at which a decoded (embedding, head, exact) delta is factored."""
PREFIX = "base_model.model."


@dataclass
class ExportReport:
    target: str = "peft"
    task_type: str | None = None
    modules: dict[str, int] = field(default_factory=dict)
    """Exported LoRA module -> rank."""
    errors: dict[str, float] = field(default_factory=dict)
    """LoRA module -> relative Frobenius error of its factors against the pack's delta."""
    how: dict[str, str] = field(default_factory=dict)
    """LoRA module -> where its factors come from."""
    saved: list[str] = field(default_factory=list)
    """Modules written whole (``modules_to_save``)."""
    biases: list[str] = field(default_factory=list)
    """Modules whose bias delta is in ``lora_B.bias``."""
    tokens: dict[str, int] = field(default_factory=dict)
    """Embeddings stored as their changed rows (PEFT's trainable tokens) -> how many rows."""
    base_variant: dict[str, str] = field(default_factory=dict)
    """Pack tensor -> why it is in the base-variant patch instead of the adapter."""
    left_out: dict[str, str] = field(default_factory=dict)
    """Pack tensor -> why it is not exported (only with ``extras="drop"``)."""
    adapter_bytes: int = 0
    max_rank: int | None = None
    tolerance: float = 0.0
    quality: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "task_type": self.task_type,
            "max_rank": self.max_rank,
            "adapter_bytes": self.adapter_bytes,
            "modules": {
                m: {"rank": r, "error": round(self.errors[m], 6), "from": self.how[m]}
                for m, r in sorted(self.modules.items())
            },
            "modules_to_save": sorted(self.saved),
            "lora_bias": sorted(self.biases),
            "trainable_tokens": dict(sorted(self.tokens.items())),
            "base_variant": dict(sorted(self.base_variant.items())),
            "left_out": dict(sorted(self.left_out.items())),
            "quality": self.quality,
        }


# -- the base model's layout ---------------------------------------------------------------------


@dataclass
class Layout:
    """What the export needs to know of the base model: module kinds, parameters, ties."""

    kinds: dict[str, str] = field(default_factory=dict)
    """Module -> "linear", "embedding", "conv1d" or "other"."""
    params: dict[str, list[str]] = field(default_factory=dict)
    """Module -> its own parameter names."""
    model_type: str | None = None
    architecture: str | None = None
    head: str | None = None
    """The output-embedding module (``lm_head``), if any."""
    tied_head: bool = False
    """The head's weight is the input embedding's (a delta on one is a delta on both)."""
    embedding: str | None = None
    known: bool = False
    """Read from the base's config (else guessed from tensor names and roles)."""

    @property
    def task_type(self) -> str | None:
        return task_type_of(self.architecture)

    @property
    def causal(self) -> bool:
        return self.task_type == "CAUSAL_LM"


TASK_SUFFIXES = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)


def task_type_of(architecture: str | None) -> str | None:
    """PEFT's task type for an HF architecture name: ``LlamaForCausalLM`` -> CAUSAL_LM, a bare
    encoder (``BertModel``) -> FEATURE_EXTRACTION; None where PEFT has none (masked LM)."""
    if not architecture:
        return None
    for suffix, task in TASK_SUFFIXES:
        if architecture.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION" if architecture.endswith("Model") else None


def model_class(config: Any) -> Any:
    """The transformers class of a config's architecture (no remote code)."""
    import transformers

    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        mapping = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        cls = (
            transformers.AutoModelForCausalLM
            if config.model_type in mapping
            else transformers.AutoModel
        )
    return cls


def read_layout(base: Path) -> Layout:
    """The module layout of the base model, from its config on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig
    from transformers.pytorch_utils import Conv1D

    from graftbuild.weights.modeling import quiet_transformers

    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(
            str(base), local_files_only=True, trust_remote_code=False
        )
    except Exception as e:
        raise UserError(f"{base}: cannot read the base model's config ({e})") from None
    cls = model_class(config)
    with torch.device("meta"):
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
    arch = (getattr(config, "architectures", None) or [getattr(cls, "__name__", None)])[0]
    layout = Layout(model_type=config.model_type, architecture=arch, known=True)
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, torch.nn.Linear):
            kind = "linear"
        elif isinstance(mod, torch.nn.Embedding):
            kind = "embedding"
        elif isinstance(mod, Conv1D):
            kind = "conv1d"
        else:
            kind = "other"
        layout.kinds[name] = kind
        layout.params[name] = [p for p, _ in mod.named_parameters(recurse=False)]
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    layout.embedding = names.get(id(inp)) if inp is not None else None
    if out is not None:
        layout.head = names.get(id(out))
        layout.tied_head = inp is not None and out.weight is inp.weight
    return layout


def guess_layout(roles: dict[str, tuple[str, int]]) -> Layout:
    """Without a base folder: module kinds from the pack's roles (tensor -> (role, ndim))."""
    layout = Layout()
    for name, (role, ndim) in roles.items():
        module, param = name.rsplit(".", 1) if "." in name else ("", name)
        if param == "weight" and ndim == 2:
            layout.kinds[module] = "embedding" if role == "embed" else "linear"
            if role == "head":
                layout.head = module
        else:
            layout.kinds.setdefault(module, "other")
    return layout


def apply_base_variant(model: Any, adapter: str | Path, sign: float = 1.0) -> list[str]:
    """Add an adapter's ``base_variant.safetensors`` deltas to ``model``'s weights in place
    (before wrapping it in PEFT); returns the tensors changed. Nothing to do without the file."""
    import torch
    from safetensors.torch import load_file

    path = Path(adapter) / BASE_VARIANT
    if not path.is_file():
        return []
    params = dict(model.state_dict(keep_vars=True))
    patch = load_file(str(path))
    with torch.no_grad():
        for name, d in patch.items():
            p = params.get(name)
            if p is None:
                raise UserError(f"{path}: tensor {name!r} is not in the model")
            p.copy_((p.float() + sign * d.float().to(p.device)).to(p.dtype))
    return sorted(patch)
