"""The eval step's response-only loss on {"prompt", "response"} jsonl datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_base

from graftbuild.errors import UserError
from graftbuild.steps.evaluate import heldout_loss, response_loss
from graftbuild.weights.textdata import read_pairs

PAIRS = [("12 + 7 =", " 19"), ("3 + 4 =", " 7"), ("the cat sat on the", " mat today")]


def test_response_loss_scores_exactly_the_response_and_eos(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_base(tmp_path / "m", seed=4)
    loss, count = response_loss(tmp_path / "m", PAIRS, batch_size=2)

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    total, n = 0.0, 0
    for prompt, response in PAIRS:  # one unpadded sequence at a time, by hand
        head = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = tok(prompt + response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ids[: len(head)] == head  # these prompts end on a token boundary
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        for pos in range(len(head), len(ids)):
            total -= logp[pos - 1, ids[pos]].item()
            n += 1
    assert count == n
    assert loss == pytest.approx(total / n, rel=1e-5)
    # Not the loss over whole lines: the prompt tokens are not scored.
    whole, _ = heldout_loss(tmp_path / "m", [p + r for p, r in PAIRS], 4, 2, tmp_path / "x.txt")
    assert whole != pytest.approx(loss, rel=1e-3)


def test_read_pairs_only_takes_prompt_response_files(tmp_path: Path) -> None:
    text = tmp_path / "a.jsonl"
    text.write_text(json.dumps({"text": "hello"}) + "\n")
    assert read_pairs(text) is None
    assert read_pairs(tmp_path / "plain.txt") is None
    pairs = tmp_path / "b.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in PAIRS))
    assert read_pairs(pairs) == PAIRS
    with pairs.open("a") as f:
        f.write(json.dumps({"prompt": "no answer"}) + "\n")
    with pytest.raises(UserError, match=r"b\.jsonl:4: expected an object with string fields"):
        read_pairs(pairs)
