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


def load_tokenizer(folder: Path) -> Any:
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
    if tok.eos_token_id is None:
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


def set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
