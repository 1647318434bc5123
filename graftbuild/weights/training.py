"""Training through TRL: what the ``sft`` and ``dpo`` steps share.

TRL is an optional extra (``pip install 'graftbuild[train]'``); everything here imports it lazily.
Runs are deterministic for fixed inputs, seed, thread count and device: the Trainer seeds every
RNG and shuffles with a seeded sampler, data loading happens in the process (no workers), and
nothing is written outside the step's own scratch folder.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from graftbuild.errors import BuildError, UserError

if TYPE_CHECKING:
    from graftbuild.progress import Reporter


class StepContext(Protocol):
    """What training reads of the step it runs in (a ``steps.base.StepContext``)."""

    node_id: str
    settings: Any
    progress: Reporter
    placement: Any


def require_trl() -> Any:
    try:
        import trl
    except ImportError:
        raise UserError(
            "training (finetune, transfer) needs TRL: pip install 'graftbuild[train]'"
        ) from None
    return trl


@contextlib.contextmanager
def quiet_training() -> Iterator[None]:
    """TRL and datasets draw their own bars and log each preprocessing pass; our progress bar
    reports the steps instead."""
    import datasets

    from graftbuild.weights.modeling import quiet_transformers

    quiet_transformers()
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    old = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        with warnings.catch_warnings():
            # transformers 5 renamed gradient_checkpointing; TRL still reads the old name
            warnings.filterwarnings("ignore", ".*gradient_checkpointing.*", FutureWarning)
            yield
    finally:
        if old is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old
        if bars:
            datasets.enable_progress_bars()


def common_args(train: dict[str, Any], scratch: Path, device: str) -> dict[str, Any]:
    """TrainingArguments shared by SFT and DPO, from a recipe's training spec."""
    length = (
        {"max_steps": train["steps"]}
        if train.get("steps") is not None
        else {"num_train_epochs": float(train["epochs"])}
    )
    return length | {
        "output_dir": str(scratch),
        "per_device_train_batch_size": train["batch_size"],
        "learning_rate": train["lr"],
        "lr_scheduler_type": "linear",
        "warmup_steps": train["warmup_steps"],
        "weight_decay": train["weight_decay"],
        "seed": train["seed"],
        "data_seed": train["seed"],
        "use_cpu": device == "cpu",
        # TRL defaults to bf16 autocast and gradient checkpointing: on a CPU the first makes
        # every matmul ~10x slower, and both change the numbers. Train in the model's dtype.
        "bf16": False,
        "fp16": False,
        "gradient_checkpointing": False,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": False,
        "save_strategy": "no",
        "report_to": [],
        "logging_strategy": "no",
        "disable_tqdm": True,
    }


def lora_config(train: dict[str, Any]) -> Any:
    """A peft LoraConfig when the spec asks for adapters, else None (full-parameter)."""
    spec = train.get("lora")
    if spec is None:
        return None
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=spec["r"],
        lora_alpha=spec["alpha"],
        lora_dropout=spec["dropout"],
        target_modules=spec["target_modules"],
    )


def progress_callback(ctx: StepContext, advance: Any, losses: list[Any] | None = None) -> Any:
    """A TrainerCallback that moves our progress bar (with the step's training loss, the mean of
    ``losses`` collected since the last step) and stops on a non-finite loss."""
    import math

    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            loss = None
            if losses:
                loss = sum(float(x) for x in losses) / len(losses)
                losses.clear()
            advance(1, loss=loss)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(loss):
                raise BuildError(f"{ctx.node_id}: training loss became {loss}; lower lr")

    return Progress()


def total_steps(train: dict[str, Any], examples: int) -> int:
    if train.get("steps") is not None:
        return int(train["steps"])
    import math

    return max(1, math.ceil(float(train["epochs"]) * math.ceil(examples / train["batch_size"])))


def fit(
    ctx: StepContext,
    kind: str,
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    train: dict[str, Any],
    **config: Any,
) -> Any:
    """Train ``model`` on ``rows`` with TRL's ``{kind}Trainer`` (``SFT`` or ``DPO``), the recipe's
    spec ``train`` and the trainer-specific ``config``; the trainer's scratch folder is removed
    afterwards. Returns the trained model, LoRA adapters merged."""
    import tempfile

    from datasets import Dataset

    trl = require_trl()
    with tempfile.TemporaryDirectory(prefix=f"graftbuild-{kind.lower()}-") as scratch:
        args = getattr(trl, f"{kind}Config")(
            **common_args(train, Path(scratch), ctx.placement.device), **config
        )
        trainer = getattr(trl, f"{kind}Trainer")(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=lora_config(train),
        )
        return run_trainer(ctx, trainer, total_steps(train, len(rows)))


def run_trainer(ctx: StepContext, trainer: Any, steps: int) -> Any:
    """Train with our progress bar; returns the trained model with any LoRA adapters merged."""
    import math

    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints the final metrics dict to stdout
    losses: list[Any] = []
    training_step = trainer.training_step

    def step(*args: Any, **kwargs: Any) -> Any:
        """The trainer's own step; its (detached) loss is only read, for the progress line."""
        loss = training_step(*args, **kwargs)
        losses.append(loss.detach() if hasattr(loss, "detach") else loss)
        return loss

    trainer.training_step = step
    with ctx.progress.task(f"train {ctx.node_id}", steps, unit="step") as advance:
        trainer.add_callback(progress_callback(ctx, advance, losses))
        result = trainer.train()
    if not math.isfinite(result.training_loss):
        raise BuildError(f"{ctx.node_id}: training loss became {result.training_loss}; lower lr")
    model = trainer.model
    if hasattr(model, "merge_and_unload"):  # a peft model: fold the adapters into the weights
        model = model.merge_and_unload()
    return model


def save_like_base(model: Any, base_dir: Path, out: Path, node_id: str) -> None:
    """Write the trained weights under the starting model's tensor names and layout (so the pack
    step pairs them one to one), with its config and tokenizer files."""
    from graftbuild.weights.tensors import (
        ModelWeights,
        TensorInfo,
        copy_non_weight_files,
        torch_dtype_to_st,
        write_model_weights,
    )

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with ModelWeights(base_dir) as base:
        names = base.names()
        missing = [n for n in names if n not in state]
        if missing:
            raise BuildError(f"{node_id}: trained model lacks tensors of {base_dir}: {missing[:5]}")
        infos = [
            TensorInfo(n, tuple(state[n].shape), torch_dtype_to_st(state[n].dtype), base_dir)
            for n in names
        ]
    copy_non_weight_files(base_dir, out)
    write_model_weights(out, infos, ((n, state[n]) for n in names), shard_size=2**62)
