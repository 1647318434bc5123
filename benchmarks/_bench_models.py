"""Training for the compression benchmark: a small Llama pre-trained on general text (plus a
little of each skill), then fully fine-tuned on distinct text skills. Models are cached in a
folder so that the compression part can be rerun without retraining (keyed by the settings)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "recipes" / "quickstart" / "data"
TOKENIZER = REPO / "recipes" / "quickstart" / "tokenizer"

MODEL = {
    "vocab_size": 512,
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 0,
}


def chunks(tok: Any, name: str, split: str, seq_len: int) -> Any:
    from graftbuild.weights.textdata import read_examples, token_chunks

    path = DATA / f"{name}.{split}.txt"
    return token_chunks(tok, read_examples(path), seq_len, path)


def train(model: Any, data: Any, steps: int, lr: float, batch: int, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(data), (batch,), generator=gen)
        loss = model(input_ids=data[idx], labels=data[idx]).loss
        if not math.isfinite(loss.item()):
            raise RuntimeError("training diverged")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def save(model: Any, folder: Path) -> None:
    import shutil

    model.save_pretrained(str(folder), safe_serialization=True)
    for p in TOKENIZER.iterdir():
        shutil.copyfile(p, folder / p.name)


def build_models(cache: Path, settings: dict[str, Any], log: Any = print) -> dict[str, Path]:
    """Base and skill model folders (trained now, or found in ``cache``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    key = json.dumps({"model": MODEL, **settings}, sort_keys=True)
    import hashlib

    root = cache / ("models-" + hashlib.sha256(key.encode()).hexdigest()[:12])
    done = root / "done.json"
    folders = {"base": root / "base"} | {s: root / s for s in settings["skills"]}
    if done.exists():
        log(f"models: reusing {root}")
        return folders
    root.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    seq = settings["seq_len"]
    torch.manual_seed(0)
    cfg = dict(MODEL)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **cfg))
    n_params = sum(p.numel() for p in model.parameters())
    t = time.time()
    # The base sees general text and a little of each skill (as a pre-trained model has seen a
    # little of everything), so that fine-tuning sharpens a skill rather than meets new symbols.
    mix = [chunks(tok, "general", "train", seq)]
    for skill in settings["skills"]:
        data = chunks(tok, skill, "train", seq)
        mix.append(data[: max(1, int(settings["base_mix"] * len(data)))])
    train(model, torch.cat(mix), settings["base_steps"], 3e-3, settings["batch"], 0)
    save(model, folders["base"])
    log(f"base: {n_params} parameters, {settings['base_steps']} steps in {time.time() - t:.0f}s")
    for i, skill in enumerate(settings["skills"]):
        t = time.time()
        m = AutoModelForCausalLM.from_pretrained(str(folders["base"]))
        train(
            m,
            chunks(tok, skill, "train", seq),
            settings["skill_steps"],
            settings["skill_lr"],
            settings["batch"],
            1 + i,
        )
        save(m, folders[skill])
        log(f"skill {skill}: {settings['skill_steps']} steps in {time.time() - t:.0f}s")
    done.write_text(key)
    return folders
