"""The fused model: exact task arithmetic, loadable by transformers, generates."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import load_weights, make

EXACT_RECIPE = """
[project]
name = "exact"

[base]
path = "models/base"

[compression.lossless]
embed = "exact"
head = "exact"
attn = "exact"
mlp = "exact"

[sources.x]
path = "models/x"
compression = "lossless"

[sources.y]
path = "models/y"
compression = "lossless"

[[fuse]]
name = "both"
packs = ["x", "y"]
weights = { x = 0.7, y = 1.3 }
shard_size = {shard}
"""


def _build(path_project: Path, shard: int = 2_000_000_000) -> Path:
    path_project.write_text(EXACT_RECIPE.replace("{shard}", str(shard)))
    result = make(path_project)
    out = result.node("fuse:both").output
    assert out is not None
    return out


def test_exact_profile_fuses_to_task_arithmetic(path_project: Path) -> None:
    out = _build(path_project)
    models = path_project.parent / "models"
    base, x, y = (load_weights(models / m) for m in ("base", "x", "y"))
    fused = load_weights(out)
    assert set(fused) == set(base)
    for name, b in base.items():
        expected = b + 0.7 * (x[name] - b) + 1.3 * (y[name] - b)
        torch.testing.assert_close(fused[name], expected, rtol=1e-5, atol=1e-6)

    from transformers import AutoModelForCausalLM

    def logits(folder: Path, state: dict | None = None) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(str(folder))
        if state is not None:
            model.load_state_dict(state)
        ids = torch.arange(1, 17).unsqueeze(0)
        with torch.no_grad():
            return model(input_ids=ids).logits

    reference = {n: b + 0.7 * (x[n] - b) + 1.3 * (y[n] - b) for n, b in base.items()}
    torch.testing.assert_close(
        logits(out), logits(models / "base", reference), rtol=1e-4, atol=1e-4
    )


def test_fused_output_loads_and_generates(path_project: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _build(path_project)
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    ids = tok("12 + 7 =", return_tensors="pt")["input_ids"]
    gen = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    assert gen.shape[1] == ids.shape[1] + 8
    assert isinstance(tok.decode(gen[0]), str)


def test_sharded_output_equals_unsharded(path_project: Path, tmp_path: Path) -> None:
    whole = load_weights(_build(path_project))
    out = _build(path_project, shard=20_000)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    sharded = load_weights(out)
    assert set(sharded) == set(whole)
    for name in whole:
        assert torch.equal(sharded[name], whole[name])

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out))  # loads through the index
