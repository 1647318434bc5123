"""``init``: a base model from a transformers config JSON, seeded random weights, a tokenizer.

For demos and tests: the weights are a pure function of (config bytes, tokenizer bytes, seed,
dtype, torch version).
"""

from __future__ import annotations

import json
import shutil
from typing import ClassVar

from graftbuild.errors import UserError
from graftbuild.hashing import iter_files
from graftbuild.steps.base import StepContext


class InitStep:
    name: ClassVar[str] = "init"
    version: ClassVar[int] = 1

    def run(self, ctx: StepContext) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from graftbuild.modeling import load_tokenizer, quiet_transformers, torch_dtype

        quiet_transformers()

        cfg_path = ctx.files["config"]
        try:
            cfg = json.loads(cfg_path.read_text())
            model_type = cfg.pop("model_type")
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"{cfg_path}: expected a transformers config JSON with model_type ({e})"
            ) from None
        try:
            config = AutoConfig.for_model(model_type, **cfg)
        except ValueError as e:
            raise UserError(f"{cfg_path}: {e}") from None
        tok_dir = ctx.files["tokenizer"]
        tok = load_tokenizer(tok_dir)
        if len(tok) > config.vocab_size:
            raise UserError(
                f"{cfg_path}: vocab_size={config.vocab_size} is smaller than the tokenizer in "
                f"{tok_dir} ({len(tok)} tokens)"
            )
        torch.manual_seed(int(ctx.config["seed"]))
        model = AutoModelForCausalLM.from_config(config)
        model = model.to(torch_dtype(ctx.config["dtype"]))
        model.save_pretrained(str(ctx.out))
        for rel, p in iter_files(tok_dir):
            target = ctx.out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, target)
