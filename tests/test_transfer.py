"""Transfer from a teacher of another architecture and tokenizer: teach -> sft -> dpo -> pack.

The teacher here is a GPT-2-style model with a character-level tokenizer; the target is the
Llama-style test base with the repo's byte-level BPE. Both are tiny and trained for a few steps:
these tests are about the build (keys, incrementality, determinism, errors). What the transfer
does to held-out losses is measured by benchmarks/transfer.py (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TINY_LLAMA, TOKENIZER
from helpers import make, plan

from graftbuild.build.engine import MakeResult
from graftbuild.cli.app import main

TINY_GPT2 = {
    "model_type": "gpt2",
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 2,
    "n_positions": 96,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}
CHAT = (
    "{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)

RECIPE = """
[project]
name = "transfer"

[base]
config = "base_config.json"
tokenizer = "tokenizer"
seed = 3

[teachers.tutor]
config = "teacher_config.json"
tokenizer = "teacher_tokenizer"
seed = 1
finetune = { data = "teacher.txt", steps = 6, batch_size = 4, seq_len = 32, lr = 3e-3 }

[sources.rev.transfer]
teacher = "tutor"
prompts = "prompts.jsonl"
generation = { max_new_tokens = 6, chat_template = true }
sft = { steps = 4, batch_size = 4, max_len = 32, seed = 1 }
dpo = { steps = 2, batch_size = 2, beta = 0.1 }

[sources.b]
finetune = { data = "b.txt", steps = 3, batch_size = 4, seq_len = 16, seed = 2 }

[[fuse]]
name = "both"
packs = ["rev", "b"]

[[fuse]]
name = "only_b"
packs = ["b"]
"""


def char_tokenizer(folder: Path, chat_template: str | None = CHAT) -> int:
    """A character-level tokenizer (another kind than the target's BPE); returns its size."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for c in string.printable:
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(str(folder))
    return len(vocab)


def teacher_folder(folder: Path, with_tokenizer: bool = True) -> None:
    """A ready-made GPT-2 teacher folder (what a user points `transfer.teacher` at)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY_GPT2)
    n = char_tokenizer(folder) if with_tokenizer else 100
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(cfg.pop("model_type"), vocab_size=n, **cfg)
    )
    model.save_pretrained(str(folder))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "base_config.json").write_text(json.dumps(TINY_LLAMA))
    shutil.copytree(TOKENIZER, tmp_path / "tokenizer")
    n = char_tokenizer(tmp_path / "teacher_tokenizer")
    (tmp_path / "teacher_config.json").write_text(json.dumps(TINY_GPT2 | {"vocab_size": n}))
    words = ["cat", "sun", "map", "tree", "stone", "river", "cloud", "lamp"]
    (tmp_path / "teacher.txt").write_text(
        "".join(f"Q: reverse {w}\nA: {w[::-1]}\n" for w in words * 4)
    )
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": f"reverse {w}"}) + "\n" for w in words)
    )
    (tmp_path / "b.txt").write_text("".join(f"def f{i}(x): return x * {i}\n" for i in range(40)))
    recipe = tmp_path / "graftbuild.toml"
    recipe.write_text(RECIPE)
    return recipe


def outputs(result: MakeResult) -> dict[str, str | None]:
    return {n.id: n.output_hash for n in result.nodes}


def test_transfer_chain_builds_then_rebuilds_only_what_changed(project: Path) -> None:
    first = make(project)
    assert sorted(first.built) == sorted(
        [
            "base",
            "source:b",
            "pack:b",
            "fuse:only_b",
            "teacher-init:tutor",
            "teacher:tutor",
            "teach:rev",
            "sft:rev",
            "dpo:rev",
            "pack:rev",
            "fuse:both",
        ]
    )
    rows = [
        json.loads(line)
        for line in (first.node("teach:rev").output / "generations.jsonl").read_text().splitlines()  # type: ignore[operator]
    ]
    assert [r["prompt"] for r in rows][:2] == ["reverse cat", "reverse sun"]
    assert all(isinstance(r["response"], str) for r in rows)
    assert make(project).built == []

    # Editing the prompts rebuilds that source's chain and the fuse using it, nothing else.
    with (project.parent / "prompts.jsonl").open("a") as f:
        f.write(json.dumps({"prompt": "reverse wolf"}) + "\n")
    p = plan(project)
    assert p["teach:rev"].reasons == ["prompts of 'rev' changed"]
    rebuilt = make(project).built
    assert rebuilt == ["teach:rev", "sft:rev", "dpo:rev", "pack:rev", "fuse:both"]

    # DPO beta: from dpo on.
    text = project.read_text().replace("beta = 0.1", "beta = 0.3")
    project.write_text(text)
    assert plan(project)["dpo:rev"].reasons == ["DPO settings of 'rev' changed"]
    assert make(project).built == ["dpo:rev", "pack:rev", "fuse:both"]

    # SFT settings: from sft on; the teacher's answers are reused.
    project.write_text(text.replace("max_len = 32, seed = 1", "max_len = 32, seed = 2"))
    assert make(project).built == ["sft:rev", "dpo:rev", "pack:rev", "fuse:both"]
    assert make(project).built == []


def test_two_clean_builds_give_identical_generations_and_weights(
    project: Path, tmp_path: Path
) -> None:
    a = make(project, cache=tmp_path / "cache-a")
    b = make(project, cache=tmp_path / "cache-b")
    ha, hb = outputs(a), outputs(b)
    for node in ("teacher:tutor", "teach:rev", "sft:rev", "dpo:rev", "pack:rev", "fuse:both"):
        assert ha[node] == hb[node], node


def test_sft_without_dpo_feeds_the_pack_and_lora_trains_only_adapters(project: Path) -> None:
    import torch
    from helpers import load_weights

    text = project.read_text().replace("dpo = { steps = 2, batch_size = 2, beta = 0.1 }\n", "")
    text = text.replace("max_len = 32, seed = 1", "max_len = 32, seed = 1, lora = { r = 2 }")
    project.write_text(text)
    result = make(project, ["pack:rev"])
    assert "dpo:rev" not in result.built and "sft:rev" in result.built
    base = load_weights(result.node("base").output)  # type: ignore[arg-type]
    tuned = load_weights(result.node("sft:rev").output)  # type: ignore[arg-type]
    assert set(base) == set(tuned)
    changed = {n for n in base if not torch.equal(base[n], tuned[n])}
    # LoRA on every linear layer, merged: projections move, embeddings and norms do not.
    assert changed and all("proj" in n for n in changed)


def run_cli(recipe: Path) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["make", str(recipe)])
    return result.exit_code, result.stderr


def test_teacher_folder_without_tokenizer_is_a_user_error(project: Path) -> None:
    teacher_folder(project.parent / "bare_teacher", with_tokenizer=False)
    project.write_text(project.read_text().replace('teacher = "tutor"', 'teacher = "bare_teacher"'))
    code, err = run_cli(project)
    assert code == 2, err
    assert "sources.rev.transfer.teacher" in err and "tokenizer" in err
    assert "Traceback" not in err


def test_prompt_line_missing_its_field_is_a_user_error(project: Path) -> None:
    with (project.parent / "prompts.jsonl").open("a") as f:
        f.write(json.dumps({"text": "reverse owl"}) + "\n")
    code, err = run_cli(project)
    assert code == 2, err
    assert "prompts.jsonl:9" in err and "'prompt'" in err


def test_chat_template_the_tokenizer_lacks_is_a_user_error(project: Path) -> None:
    teacher_folder(project.parent / "plain_teacher")
    cfg = project.parent / "plain_teacher" / "tokenizer_config.json"
    data = json.loads(cfg.read_text())
    data.pop("chat_template", None)
    cfg.write_text(json.dumps(data))
    (project.parent / "plain_teacher" / "chat_template.jinja").unlink(missing_ok=True)
    text = project.read_text()
    project.write_text(text.replace('teacher = "tutor"', 'teacher = "plain_teacher"'))
    code, err = run_cli(project)
    assert code == 2, err
    assert "sources.rev.transfer.generation" in err and "no chat template" in err


def test_a_folder_teacher_is_an_input_node(project: Path) -> None:
    teacher_folder(project.parent / "gpt2_teacher")
    text = project.read_text().replace('teacher = "tutor"', 'teacher = "gpt2_teacher"')
    start = text.index("[teachers.tutor]")
    project.write_text(text[:start] + text[text.index("[sources.rev.transfer]") :])
    p = plan(project)
    assert "teacher:rev" in p and "teacher:tutor" not in p and "teacher-init:tutor" not in p
    assert make(project, ["teach:rev"]).built == ["teacher:rev", "teach:rev"]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("sft = { steps = 4,", "sft = { epochs = 1, steps = 4,", "give either `steps` or `epochs`"),
        (
            "generation = { max_new_tokens = 6,",
            "generation = { samples = 2, max_new_tokens = 6,",
            "`samples` > 1 needs `temperature` > 0",
        ),
        ('teacher = "tutor"', 'teacher = "tutor"\npath = "x"', "unknown key"),
        ("beta = 0.1", "betta = 0.1", "did you mean 'beta'"),
    ],
)
def test_recipe_errors(project: Path, old: str, new: str, expected: str) -> None:
    project.write_text(project.read_text().replace(old, new))
    code, err = run_cli(project)
    assert code == 2 and expected in err, err


def test_training_without_trl_asks_for_the_train_extra(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "trl", None)  # import trl -> ImportError
    code, err = run_cli(project)
    assert code == 2, err
    assert "pip install 'graftbuild[train]'" in err
