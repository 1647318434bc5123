"""Checkpoints as users have them: buffers, added tokens, PEFT adapter folders, zero deltas and
sentence-transformers subfolders (issue 16)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA, make_base, make_source
from helpers import load_weights, make

from graftbuild.errors import UserError
from graftbuild.skillpack import PackReader

LOSSLESS = """
[compression.lossless]
embed = "exact"
head = "exact"
attn = "exact"
mlp = "exact"
expert = "exact"
router = "exact"
"""


def recipe(tmp: Path, sources: dict[str, tuple[str, str]], fuse: dict[str, list[str]]) -> Path:
    """A recipe with base ``models/base``, sources name -> (folder, profile), fuses."""
    body = f'[project]\nname = "t"\ncache = "cache"\n\n[base]\npath = "models/base"\n{LOSSLESS}'
    for name, (folder, profile) in sources.items():
        body += f'\n[sources.{name}]\npath = "{folder}"\ncompression = "{profile}"\n'
    for name, packs in fuse.items():
        body += f'\n[[fuse]]\nname = "{name}"\npacks = {json.dumps(packs)}\n'
    path = tmp / "graftbuild.toml"
    path.write_text(body)
    return path


TINY_BERT = {
    "vocab_size": 96,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}


def _bert(folder: Path, seed: int) -> dict[str, torch.Tensor]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    model = BertModel(BertConfig(**TINY_BERT))
    model.save_pretrained(str(folder))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_buffers_are_carried_from_the_base_never_packed(tmp_path: Path) -> None:
    """A BERT base saved with its int64 ``position_ids`` buffer (older transformers) and a
    fine-tune saved without it: packed and fused; the buffer is the base's."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    base = tmp_path / "models" / "base"
    state = _bert(base, 0)
    weights = load_file(str(base / "model.safetensors"))
    position_ids = torch.arange(TINY_BERT["max_position_embeddings"]).unsqueeze(0)
    weights["embeddings.position_ids"] = position_ids
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    ft = tmp_path / "models" / "ft"
    shutil.copytree(base, ft)
    g = torch.Generator().manual_seed(1)
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    save_file(tuned, str(ft / "model.safetensors"), metadata={"format": "pt"})  # no buffer

    result = make(recipe(tmp_path, {"ft": ("models/ft", "lossless")}, {"out": ["ft"]}))
    with PackReader(result.node("pack:ft").output / "skillpack.safetensors") as r:
        assert "embeddings.position_ids" not in r.entries
        assert set(r.entries) == set(tuned)
    fused_dir = result.node("fuse:out").output
    fused = load_weights(fused_dir)
    assert torch.equal(fused["embeddings.position_ids"], position_ids)
    for k, v in tuned.items():
        torch.testing.assert_close(fused[k], v, rtol=0, atol=1e-6)
    model = AutoModel.from_pretrained(str(fused_dir))
    model(torch.tensor([[1, 2, 3]]))


def test_gpt2_causal_mask_buffers_missing_from_the_fine_tune_are_carried(tmp_path: Path) -> None:
    """The hub's GPT-2 saves float causal-mask buffers (``h.N.attn.bias``); a fine-tune saved by
    a newer transformers lacks them: they are carried from the base, not a layout error."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "gpt2", vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16
    )
    model = AutoModelForCausalLM.from_config(cfg)
    base, ft = tmp_path / "models" / "base", tmp_path / "models" / "ft"
    model.save_pretrained(str(base))
    model.save_pretrained(str(ft))
    weights = load_file(str(base / "model.safetensors"))
    tuned = {k: v + 0.01 for k, v in weights.items()}
    save_file(tuned, str(ft / "model.safetensors"), metadata={"format": "pt"})
    mask = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)
    for i in range(2):
        weights[f"h.{i}.attn.bias"] = mask.clone()
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})

    result = make(recipe(tmp_path, {"ft": ("models/ft", "lossless")}, {"out": ["ft"]}))
    fused = load_weights(result.node("fuse:out").output)
    assert torch.equal(fused["h.0.attn.bias"], mask)
    for k, v in tuned.items():
        torch.testing.assert_close(fused[k], v, rtol=0, atol=1e-6, msg=k)


def test_identical_source_packs_to_a_few_header_bytes(tmp_path: Path) -> None:
    """Every delta is zero: the pack holds entries and no data, under 64 KiB, and the fuse is
    the base."""
    cfg = dict(TINY_LLAMA, vocab_size=1024, hidden_size=64, intermediate_size=128)
    base_state = make_base(tmp_path / "models" / "base", config=cfg)
    shutil.copytree(tmp_path / "models" / "base", tmp_path / "models" / "same")
    path = recipe(
        tmp_path,
        {"same": ("models/same", "default"), "same_exact": ("models/same", "lossless")},
        {"out": ["same"]},
    )
    result = make(path)
    dense = sum(v.numel() * 4 for v in base_state.values())
    for node in ("pack:same", "pack:same_exact"):
        pack = result.node(node).output / "skillpack.safetensors"
        assert pack.stat().st_size < 64 * 1024 < dense
        with PackReader(pack) as r:
            # a lossless profile writes a reference pack (no payload at all); others store
            # every all-zero delta as a `zero` entry
            codecs = {"exact"} if node == "pack:same_exact" else {"zero"}
            assert {e["codec"] for e in r.entries.values()} == codecs
            assert r.is_reference == (node == "pack:same_exact")
            assert r.payload_nbytes() == 0
            assert set(r.entries) == set(base_state)
    fused = load_weights(result.node("fuse:out").output)
    for k, v in base_state.items():
        assert torch.equal(fused[k], v)


def test_zero_deltas_cost_nothing_beside_changed_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fine-tune that changed one tensor: every other tensor is a zero entry (in a stored
    pack: a lossless profile of a source against the base is otherwise a reference pack)."""
    from safetensors.torch import save_file

    from graftbuild.steps import pack as pack_step

    monkeypatch.setattr(pack_step, "REFERENCE_LOSSLESS", False)

    state = make_base(tmp_path / "models" / "base")
    ft = tmp_path / "models" / "ft"
    shutil.copytree(tmp_path / "models" / "base", ft)
    name = "model.layers.0.self_attn.q_proj.weight"
    tuned = dict(state)
    tuned[name] = state[name] + 0.01
    save_file(tuned, str(ft / "model.safetensors"), metadata={"format": "pt"})
    result = make(recipe(tmp_path, {"ft": ("models/ft", "lossless")}, {"out": ["ft"]}))
    with PackReader(result.node("pack:ft").output / "skillpack.safetensors") as r:
        codecs = {n: e["codec"] for n, e in r.entries.items()}
        assert codecs.pop(name) == "exact" and set(codecs.values()) == {"zero"}
        assert r.payload_nbytes() == state[name].numel() * 4
    fused = load_weights(result.node("fuse:out").output)
    torch.testing.assert_close(fused[name], tuned[name], rtol=0, atol=1e-6)


def _peft_adapter(base: Path, out: Path, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA adapter made with peft on the base (B randomised, as after training); returns the
    merged model's state dict (peft's merge_and_unload)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base))
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 2},
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(str(out))
    merged = peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def test_peft_adapter_folder_as_a_source(tmp_path: Path) -> None:
    """An unmerged LoRA adapter folder is a source: its fuse equals peft's merged model, and
    the default profile stores each LoRA delta low-rank at the adapter's rank."""
    make_base(tmp_path / "models" / "base")
    adapter = tmp_path / "models" / "adapter"
    merged = _peft_adapter(tmp_path / "models" / "base", adapter, seed=3)
    path = recipe(
        tmp_path,
        {"lora": ("models/adapter", "default"), "lora_exact": ("models/adapter", "lossless")},
        {"out": ["lora"], "exact": ["lora_exact"]},
    )
    result = make(path)
    with PackReader(result.node("pack:lora").output / "skillpack.safetensors") as r:
        entries = r.entries
    q = entries["model.layers.0.self_attn.q_proj.weight"]
    down = entries["model.layers.1.mlp.down_proj.weight"]
    assert (q["codec"], q["meta"]["rank"]) == ("lowrank", 4)
    assert (down["codec"], down["meta"]["rank"]) == ("lowrank", 2)  # rank_pattern
    assert entries["model.layers.0.mlp.up_proj.weight"]["codec"] == "zero"
    # inspect reads the adapter's own deltas for its errors
    from graftbuild.skillpack.report import pack_report

    report = pack_report(
        result.node("pack:lora").output / "skillpack.safetensors",
        tmp_path / "models" / "base",
        adapter,
    )
    rows = {t["name"]: t for t in report["tensors"]}
    assert rows["model.layers.0.self_attn.q_proj.weight"]["rel_error"] < 1e-3
    for fuse, atol in (("fuse:exact", 1e-6), ("fuse:out", 2e-3)):
        fused = load_weights(result.node(fuse).output)
        assert set(fused) == set(merged)
        for k, v in merged.items():
            torch.testing.assert_close(fused[k], v, rtol=0, atol=atol, msg=f"{fuse} {k}")


def test_peft_adapter_with_embedding_lora_saved_modules_and_conv1d(tmp_path: Path) -> None:
    """GPT-2 (Conv1D layers: fan_in_fan_out), an embedding LoRA, a trained bias and a module
    saved whole (modules_to_save): the fuse still equals peft's merged model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    sizes = {"vocab_size": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 16}
    cfg = AutoConfig.for_model("gpt2", bos_token_id=0, eos_token_id=0, **sizes)
    base = tmp_path / "models" / "base"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base))
    config = LoraConfig(
        r=4,
        lora_alpha=4,
        use_rslora=True,
        target_modules=["c_attn", "wte"],
        modules_to_save=["ln_f"],
        bias="lora_only",
        fan_in_fan_out=True,
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if (
                "lora_B" in n
                or "lora_embedding_B" in n
                or "modules_to_save" in n
                or ("c_attn" in n and n.endswith(".bias"))
            ):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(str(tmp_path / "models" / "adapter"))
    merged = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    path = recipe(tmp_path, {"lora": ("models/adapter", "lossless")}, {"out": ["lora"]})
    fused = load_weights(make(path).node("fuse:out").output)
    changed = 0
    for k, v in fused.items():
        torch.testing.assert_close(v, merged[k], rtol=0, atol=1e-5, msg=k)
        changed += not torch.equal(v, load_weights(base)[k])
    assert changed >= 6  # c_attn weights and biases, wte, ln_f


def _with_added_tokens(
    base: Path, out: Path, tokens: list[str], seed: int, resize: bool = True
) -> dict[str, torch.Tensor]:
    """A fine-tune of ``base`` that added ``tokens`` (resize_token_embeddings) and trained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    tok.add_tokens(tokens, special_tokens=True)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    if resize:
        model.resize_token_embeddings(len(tok))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_added_tokens_extend_the_fused_vocabulary(tmp_path: Path) -> None:
    """A fine-tune adds two tokens: the fused model loads, has the new vocabulary and the
    tokenizer, and gives the source's rows exactly under a lossless profile. A second source's
    tokens follow in fusion order."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = tmp_path / "models"
    make_base(models / "base")
    base_len = len(AutoTokenizer.from_pretrained(str(models / "base")))
    assert base_len == TINY_LLAMA["vocab_size"]
    tools = _with_added_tokens(models / "base", models / "tools", ["<tool>", "</tool>"], 1)
    chat = _with_added_tokens(models / "base", models / "chat", ["<|user|>"], 2)
    path = recipe(
        tmp_path,
        {"tools": ("models/tools", "lossless"), "chat": ("models/chat", "lossless")},
        {"one": ["tools"], "both": ["tools", "chat"]},
    )
    result = make(path)
    one = result.node("fuse:one").output
    tok = AutoTokenizer.from_pretrained(str(one))
    assert tok.convert_tokens_to_ids(["<tool>", "</tool>"]) == [base_len, base_len + 1]
    model = AutoModelForCausalLM.from_pretrained(str(one))
    assert model.config.vocab_size == base_len + 2
    fused = load_weights(one)
    for k, v in tools.items():
        torch.testing.assert_close(fused[k], v, rtol=0, atol=1e-6, msg=k)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(fused[name][base_len:], tools[name][base_len:])
    from graftbuild.skillpack.report import pack_report

    pack = result.node("pack:tools").output / "skillpack.safetensors"
    rows = {t["name"]: t for t in pack_report(pack, models / "base", models / "tools")["tensors"]}
    assert rows["model.embed_tokens.weight"]["rel_error"] == 0.0
    assert rows["model.embed_tokens.weight"]["shape"] == [base_len + 2, TINY_LLAMA["hidden_size"]]
    ids = tok("<tool> hi </tool>", return_tensors="pt")["input_ids"]
    assert base_len in ids[0].tolist()
    model(ids)

    both = result.node("fuse:both").output
    tok2 = AutoTokenizer.from_pretrained(str(both))
    assert tok2.convert_tokens_to_ids(["<tool>", "</tool>", "<|user|>"]) == [
        base_len,
        base_len + 1,
        base_len + 2,
    ]
    fused2 = load_weights(both)
    emb = "model.embed_tokens.weight"
    assert fused2[emb].shape[0] == base_len + 3
    assert torch.equal(fused2[emb][base_len + 2], chat[emb][base_len])  # moved to its fused id
    assert torch.equal(fused2[emb][base_len], tools[emb][base_len])
    AutoModelForCausalLM.from_pretrained(str(both))(ids)


def test_tokens_added_within_a_padded_vocabulary_keep_their_rows(tmp_path: Path) -> None:
    """A base whose embeddings have spare rows (a padded vocabulary): a fine-tune adds tokens
    without resizing; the fused tokenizer has them at the same ids and the shapes stay."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = tmp_path / "models"
    make_base(models / "base", config=dict(TINY_LLAMA, vocab_size=520))
    base_len = len(AutoTokenizer.from_pretrained(str(models / "base")))
    assert base_len < 520
    tuned = _with_added_tokens(models / "base", models / "ft", ["<a>", "<b>"], 1, resize=False)
    assert tuned["model.embed_tokens.weight"].shape[0] == 520  # no resize needed
    result = make(recipe(tmp_path, {"ft": ("models/ft", "lossless")}, {"o": ["ft"]}))
    with PackReader(result.node("pack:ft").output / "skillpack.safetensors") as r:
        assert [t["content"] for t in r.header["vocab"]["tokens"]] == ["<a>", "<b>"]
    out = result.node("fuse:o").output
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids(["<a>", "<b>"]) == [base_len, base_len + 1]
    fused = load_weights(out)
    torch.testing.assert_close(
        fused["model.embed_tokens.weight"], tuned["model.embed_tokens.weight"], rtol=0, atol=1e-6
    )
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.vocab_size == 520


def test_conflicting_added_tokens_are_refused_naming_them(tmp_path: Path) -> None:
    models = tmp_path / "models"
    make_base(models / "base")
    _with_added_tokens(models / "base", models / "a", ["<x>", "<y>"], 1)
    _with_added_tokens(models / "base", models / "b", ["<y>"], 2)  # <y> at another id
    path = recipe(
        tmp_path, {"a": ("models/a", "lossless"), "b": ("models/b", "lossless")}, {"o": ["a", "b"]}
    )
    with pytest.raises(UserError, match=r"'<y>'.*different ids"):
        make(path)


def test_packs_with_added_tokens_are_refused_by_bundles_and_peft_export(tmp_path: Path) -> None:
    """A routed bundle keeps the base's vocabulary and a LoRA adapter cannot add rows: both say
    so, naming the tokens, rather than dropping them."""
    from graftbuild.release.peft import export_peft

    models = tmp_path / "models"
    make_base(models / "base")
    _with_added_tokens(models / "base", models / "a", ["<x>"], 1)
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    path = recipe(tmp_path, {"a": ("models/a", "default")}, {})
    path.write_text(
        path.read_text()
        + '\n[[fuse]]\nname = "r"\npacks = ["a"]\nstrategy = "routed"\n'
        + '[fuse.options]\nprompts = { a = "p.txt" }\n'
    )
    with pytest.raises(UserError, match=r"pack 'a' adds tokens \('<x>'\); a routed bundle"):
        make(path)
    pack = make(path, ["pack:a"]).node("pack:a").output / "skillpack.safetensors"
    with pytest.raises(UserError, match=r"adds tokens \('<x>'\); a LoRA adapter"):
        export_peft(pack, tmp_path / "adapter")


def test_changed_base_vocabulary_is_refused(tmp_path: Path) -> None:
    models = tmp_path / "models"
    make_base(models / "base")
    ft = models / "ft"
    shutil.copytree(models / "base", ft)
    tj = json.loads((ft / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (ft / "tokenizer.json").write_text(json.dumps(tj))
    path = recipe(tmp_path, {"ft": ("models/ft", "lossless")}, {"o": ["ft"]})
    with pytest.raises(UserError, match="changes the base's vocabulary"):
        make(path)


def _sentence_transformer(folder: Path, bert: Path) -> None:
    from sentence_transformers import SentenceTransformer, models

    st = SentenceTransformer(
        modules=[
            models.Transformer(str(bert)),
            models.Pooling(TINY_BERT["hidden_size"], pooling_mode="mean"),
            models.Normalize(),
        ],
        device="cpu",
    )
    st.save(str(folder))


def test_sentence_transformers_output_loads_with_its_subfolders(tmp_path: Path) -> None:
    """A sentence-transformers base (modules.json, 1_Pooling/, 2_Normalize/): the fused output
    loads with SentenceTransformer and gives the source's embeddings."""
    from safetensors.torch import load_file, save_file
    from sentence_transformers import SentenceTransformer
    from transformers import BertTokenizerFast

    bert = tmp_path / "bert"
    _bert(bert, 0)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(80)]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(str(bert))
    models = tmp_path / "models"
    _sentence_transformer(models / "base", bert)
    assert (models / "base" / "1_Pooling" / "config.json").is_file()
    ft = models / "ft"
    shutil.copytree(models / "base", ft)
    weights = load_file(str(ft / "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    tuned = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in weights.items()}
    save_file(tuned, str(ft / "model.safetensors"), metadata={"format": "pt"})

    result = make(recipe(tmp_path, {"ft": ("models/ft", "lossless")}, {"st": ["ft"]}))
    out = result.node("fuse:st").output
    for rel in (
        "modules.json",
        "1_Pooling/config.json",
        "2_Normalize/config.json",
        "config_sentence_transformers.json",
        "tokenizer.json",
    ):
        assert (out / rel).is_file(), rel
    texts = ["w1 w2 w3", "w40 w7"]
    want = SentenceTransformer(str(ft), device="cpu").encode(texts, convert_to_tensor=True)
    got = SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_tensor=True)
    base = SentenceTransformer(str(models / "base"), device="cpu").encode(
        texts, convert_to_tensor=True
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not torch.allclose(base, want, atol=1e-3)


def test_sources_that_add_no_tokens_record_no_vocabulary(tmp_path: Path) -> None:
    """A source with the base's tokenizer files, and one saved without a tokenizer (a Trainer
    checkpoint), add no tokens: no `vocab` in their packs, the output keeps the base's."""
    models = tmp_path / "models"
    make_base(models / "base")
    make_source(models / "x", models / "base", seed=1)
    make_source(models / "bare", models / "base", seed=2)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (models / "bare" / name).unlink()
    path = recipe(
        tmp_path, {"x": ("models/x", "default"), "bare": ("models/bare", "default")}, {"o": ["x"]}
    )
    result = make(path)
    for node in ("pack:x", "pack:bare"):
        with PackReader(result.node(node).output / "skillpack.safetensors") as r:
            assert "vocab" not in r.header
    out = result.node("fuse:o").output
    assert (out / "tokenizer.json").read_bytes() == (
        models / "base" / "tokenizer.json"
    ).read_bytes()


def test_outputs_copy_the_non_weight_tree_but_no_weights(tmp_path: Path) -> None:
    """Subfolders (and a module's own weights in one) are copied; the top-level weights, other
    runtimes' weights, hidden files and markdown are not."""
    from graftbuild.weights.tensors import copy_non_weight_files

    src, dst = tmp_path / "src", tmp_path / "dst"
    files = {
        "config.json": True,
        "modules.json": True,
        "1_Pooling/config.json": True,
        "2_Dense/model.safetensors": True,
        "2_Dense/config.json": True,
        "model.safetensors": False,
        "model.safetensors.index.json": False,
        "pytorch_model.bin": False,
        "onnx/model.onnx": False,
        "openvino/openvino_model.xml": False,
        "tf_model.h5": False,
        ".gitattributes": False,
        "README.md": False,
    }
    for rel in files:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    dst.mkdir()
    copy_non_weight_files(src, dst)
    for rel, copied in files.items():
        assert (dst / rel).is_file() == copied, rel
    assert (dst / "1_Pooling" / "config.json").read_text() == "1_Pooling/config.json"
