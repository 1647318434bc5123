"""``init``: a base model from a transformers config JSON, seeded random weights, a tokenizer.

For demos and tests: the weights are a pure function of (config bytes, tokenizer bytes, seed,
dtype, torch version).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from graftbuild.cache.hashing import iter_files
from graftbuild.errors import UserError
from graftbuild.recipe import ids
from graftbuild.steps.base import Node, StepContext, declared_models

if TYPE_CHECKING:
    from graftbuild.recipe import Recipe


class InitStep:
    name: ClassVar[str] = "init"
    version: ClassVar[int] = 1
    uses_accelerator: ClassVar[bool] = True

    def nodes(self, recipe: Recipe, out: Path) -> list[Node]:
        """A seeded init per model declared with ``config``: the model itself, or, when it is
        trained on text first, its ``…-init`` node."""
        nodes = []
        for node, spec, folder, what in declared_models(recipe, out):
            if spec.path is not None:
                continue
            trained = spec.finetune is not None
            first = ids.init_of(node) if trained else node
            nodes.append(
                Node(
                    first,
                    "init",
                    config={"seed": spec.seed, "dtype": spec.dtype},
                    files={"config": spec.config, "tokenizer": spec.tokenizer},
                    labels={
                        "file:config": f"{what} config changed",
                        "file:tokenizer": f"{what} tokenizer changed",
                        "config.seed": f"{what} init seed changed",
                        "config.dtype": f"{what} dtype changed",
                    },
                    output=folder.parent / first.replace(":", "-") if trained else folder,
                )
            )
        return nodes

    def run(self, ctx: StepContext) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from graftbuild.weights.modeling import load_tokenizer, quiet_transformers, torch_dtype
        from graftbuild.weights.tensors import check_finite

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
        except Exception as e:  # transformers' own validation (ValueError, strict dataclasses)
            message = " ".join(str(e).split())
            raise UserError(f"{cfg_path}: not a valid {model_type} config: {message}") from None
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
        for name, t in model.state_dict().items():  # saved by transformers, not our writer
            check_finite(name, t)
        model.save_pretrained(str(ctx.out))
        for rel, p in iter_files(tok_dir):
            target = ctx.out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, target)
