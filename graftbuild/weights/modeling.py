"""Loading local Hugging Face models and tokenizers, safely: local files, safetensors, no remote
code."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from graftbuild.errors import UserError
from graftbuild.weights.tensors import weight_files

if TYPE_CHECKING:
    import torch

    from graftbuild.weights.placement import Placement

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, DTYPES[name])


def quiet_transformers() -> None:
    """Our own progress bars report steps; transformers' per-load bars would only add noise."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def load_tokenizer(folder: Path, need_eos: bool = True) -> Any:
    """The folder's tokenizer. ``need_eos``: refuse one without an eos token (causal-LM text
    is joined and ended by eos); encoders and hidden-state users pass False."""
    from transformers import AutoTokenizer

    quiet_transformers()
    # transformers 5 builds an empty tokenizer from config.json alone; refuse that up front.
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(
            f"{folder}: no tokenizer in this folder (expected one of {', '.join(TOKENIZER_FILES)})"
        )
    try:
        tok = AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False
        )
    except Exception as e:  # transformers raises many types; all mean "not a usable tokenizer"
        raise UserError(f"{folder}: cannot load a tokenizer from this folder ({e})") from None
    if need_eos and tok.eos_token_id is None:
        raise UserError(f"{folder}: the tokenizer defines no eos token")
    return tok


def load_causal_lm(folder: Path, where: Placement | str | None = None) -> Any:
    """A causal LM from a local folder (safetensors only, no remote code), placed by ``where``
    (a Placement, a device, or None: the CPU)."""
    from transformers import AutoModelForCausalLM

    from graftbuild.weights.placement import Placement

    quiet_transformers()
    weight_files(folder)  # refuses pickles and empty folders with a clear message
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False, use_safetensors=True
        )
    except Exception as e:
        raise UserError(f"{folder}: cannot load as a causal language model ({e})") from None
    return Placement.of(where).model(model)


# Architecture class suffix -> the transformers Auto class that loads it, most specific first.
AUTO_CLASSES = (
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("LMHeadModel", "AutoModelForCausalLM"),
    ("ForMaskedLM", "AutoModelForMaskedLM"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
    ("ForPreTraining", "AutoModelForPreTraining"),
    ("Model", "AutoModel"),
)


def read_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a model folder ({} when there is none or it is not a JSON object)."""
    import json

    try:
        doc = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def auto_class(config: dict[str, Any]) -> str:
    """The Auto class that loads a model with this config, as transformers names it.

    From ``architectures`` when the config lists one; otherwise a model type that has a masked-LM
    head and is not a decoder is taken as an encoder (``AutoModel``), anything else as a causal LM.
    """
    for arch in config.get("architectures") or []:
        for suffix, cls in AUTO_CLASSES:
            if isinstance(arch, str) and arch.endswith(suffix):
                return cls
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if config.get("model_type") in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.get(
        "is_decoder"
    ):
        return "AutoModel"
    return "AutoModelForCausalLM"


def is_causal_lm(folder: Path) -> bool:
    """Whether the model in ``folder`` is a causal LM (next-token loss, generation) rather than
    an encoder (hidden states: retrieval, routing and calibration only)."""
    return auto_class(read_config(folder)) == "AutoModelForCausalLM"


def load_model(folder: Path, where: Placement | str | None = None) -> Any:
    """The model in ``folder`` with the Auto class its architecture names (a causal LM, an
    encoder, a masked LM, ...): tensor names match the checkpoint's, and ``output_hidden_states``
    works for all. Safetensors only, no remote code."""
    import transformers

    from graftbuild.weights.placement import Placement

    name = auto_class(read_config(folder))
    if name == "AutoModelForCausalLM":
        return load_causal_lm(folder, where)
    quiet_transformers()
    weight_files(folder)
    try:
        model = getattr(transformers, name).from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False, use_safetensors=True
        )
    except Exception as e:
        raise UserError(f"{folder}: cannot load with {name} ({e})") from None
    return Placement.of(where).model(model)


def set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
