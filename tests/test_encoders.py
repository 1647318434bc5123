"""Encoders end to end: routed fusion, retrieval eval, GPTQ calibration and the release card on a
tiny BERT base whose tokenizer has no eos token (as real BERT tokenizers do not)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO, read_json
from helpers import make, plan

from graftbuild.errors import UserError

DATA = REPO / "recipes" / "quickstart" / "data"
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS += list("abcdefghijklmnopqrstuvwxyz0123456789+=-*/().,:_'\"")
WORDS += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
TINY_BERT = {
    "vocab_size": len(WORDS),
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
}


def make_bert(folder: Path, seed: int = 0) -> None:
    """A seeded BertModel (as sentence-transformers checkpoints are) with a WordPiece tokenizer."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(str(folder))
    torch.manual_seed(seed)
    BertModel(BertConfig(**TINY_BERT), add_pooling_layer=False).save_pretrained(str(folder))
    assert BertTokenizer.from_pretrained(str(folder)).eos_token_id is None


def make_bert_source(folder: Path, base: Path, seed: int) -> None:
    """A synthetic fine-tune of the BERT base: a low-rank change and small noise per matrix."""
    import torch
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in sorted(load_file(str(base / "model.safetensors")).items()):
        if t.ndim == 2:
            low = torch.randn(t.shape[0], 2, generator=g) @ torch.randn(2, t.shape[1], generator=g)
            out[name] = t + 0.025 * low + 0.005 * torch.randn(t.shape, generator=g)
        else:
            out[name] = t + 0.01 * torch.randn(t.shape, generator=g)
    shutil.copytree(base, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})


def retrieval_file(path: Path, n: int = 24) -> Path:
    """{query, doc} rows: an arithmetic question and its worked line."""
    rows = []
    for i in range(n):
        a, b = 3 + 7 * i % 41, 5 + 11 * i % 37
        rows.append({"query": f"what is {a} + {b}", "doc": f"{a} + {b} = {a + b}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


RECIPE = f"""
[project]
name = "enc"

[base]
path = "models/base"

[compression.default]

[compression.calibrated]
calibration = {{ data = "{DATA}/general.train.txt", samples = 8, seq_len = 32 }}

[sources.x]
path = "models/x"
compression = "calibrated"

[sources.y]
path = "models/y"

[[fuse]]
name = "sum"
packs = ["x", "y"]
weights = {{ x = 0.5, y = 0.5 }}

[[fuse]]
name = "routed"
packs = ["x", "y"]
strategy = "routed"
[fuse.options]
prompts = {{ x = "{DATA}/arith.train.txt", y = "{DATA}/code.train.txt" }}
base_prompts = "{DATA}/general.train.txt"
samples = 40
heldout = {{ x = "retrieval.jsonl" }}  # an encoder's options are chosen by retrieval

[[eval]]
name = "retrieval"
models = ["base", "source:x", "fuse:sum"]
data = {{ arith = "retrieval.jsonl" }}

[[release]]
name = "sum"
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("enc")
    make_bert(root / "models" / "base")
    for name, seed in (("x", 1), ("y", 2)):
        make_bert_source(root / "models" / name, root / "models" / "base", seed=seed)
    retrieval_file(root / "retrieval.jsonl")
    recipe = root / "graftbuild.toml"
    recipe.write_text(RECIPE)
    make(recipe)
    return recipe


def test_routed_bundle_on_an_encoder_routes_by_hidden_states(project: Path) -> None:
    from graftbuild.runtime import GraftedModel
    from graftbuild.steps.evaluate import retrieval_metrics
    from graftbuild.weights.textdata import read_retrieval

    rows = read_retrieval(project.parent / "retrieval.jsonl")
    g = GraftedModel.from_pretrained(project.parent / "out" / "fused" / "routed")
    assert type(g.model).__name__ == "BertModel"
    assert g.router is not None and g.router.classes == ["x", "y", ""]
    # no next-token loss: x's domain is served by the option that retrieves its held-out
    # {query, doc} rows best; the others, with no pairs to measure, by their own option
    info = g.router.info
    assert info["select"] == "loss" and info["metrics"] == {"x": "1 - mrr"}
    losses = info["losses"]["x"]
    assert set(losses) == {"base", "x", "y", "x+y"}
    base_mrr = retrieval_metrics(project.parent / "models" / "base", rows, 64, 16)["mrr"]
    assert losses["base"] == pytest.approx(1 - base_mrr, abs=1e-6)
    labels = ["base", "x", "y", "x+y"]
    assert g.router.choice == {
        "x": labels.index(min(losses, key=losses.__getitem__)),
        "y": 2,
        "": 0,
    }
    train = {
        "x": (DATA / "arith.train.txt").read_text().splitlines()[:40],
        "y": (DATA / "code.train.txt").read_text().splitlines()[:40],
        "": (DATA / "general.train.txt").read_text().splitlines()[:40],
    }
    for cls, texts in train.items():  # the router separates what it was fitted on
        routed = g.route(texts)
        want = g.router.options[g.router.choice[cls]]  # the option serving that domain
        right = sum(r == want for r in routed)
        assert right >= 0.9 * len(texts), (cls, right)
    with g.using("x"):  # packs switch in on the encoder's own tensor names
        assert g.active == ["x"]
    with pytest.raises(UserError, match="encoder"):
        g.generate(["12 + 7 ="])
    g.close()


def test_retrieval_eval_reports_mrr_and_recall(project: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    metrics = read_json(project.parent / "out" / "evals" / "retrieval" / "metrics.json")
    assert set(metrics) == {"base", "source:x", "fuse:sum"}
    rows = [json.loads(line) for line in (project.parent / "retrieval.jsonl").open()]
    # The same numbers by hand: mean-pooled, normalised embeddings, rank of the own doc.
    folder = project.parent / "models" / "x"
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()

    def emb(texts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            out = []
            for t in texts:
                ids = torch.tensor([tok(t)["input_ids"]])
                out.append(model(input_ids=ids).last_hidden_state[0].mean(0))
        return torch.nn.functional.normalize(torch.stack(out), dim=1)

    q, d = emb([r["query"] for r in rows]), emb([r["doc"] for r in rows])
    s = q @ d.T
    ranks = [int((s[i] > s[i, i]).sum()) + 1 for i in range(len(rows))]
    got = metrics["source:x"]["arith"]
    assert got["queries"] == got["docs"] == len(rows)
    assert got["mrr"] == pytest.approx(sum(1 / r for r in ranks) / len(rows), abs=1e-4)
    assert got["recall@1"] == pytest.approx(sum(r == 1 for r in ranks) / len(rows), abs=1e-6)
    assert metrics["base"]["arith"]["mrr"] != got["mrr"]  # a different model ranks differently


def test_calibration_runs_on_the_encoder(project: Path) -> None:
    from graftbuild.compress.calibration import collect_statistics
    from graftbuild.weights.tensors import read_header

    base = project.parent / "models" / "base"
    stats = collect_statistics(base, DATA / "general.train.txt", samples=4, seq_len=32)
    linear = [
        k
        for k, v in read_header(base / "model.safetensors").items()
        if k.endswith(".weight") and len(v["shape"]) == 2 and "embeddings" not in k
    ]
    assert set(linear) <= {k for k, v in stats.items() if v.ndim == 2}
    assert stats["embeddings.word_embeddings.weight"].sum().item() == pytest.approx(1.0)
    # pack:x (profile "calibrated") ran this on the base in the fixture's build
    lock = read_json(project.with_suffix(".lock"))
    assert "calibration" in json.dumps(lock["nodes"]["pack:x"])


def test_release_card_names_the_encoder_class(project: Path) -> None:
    card = (project.parent / "out" / "release" / "sum" / "README.md").read_text()
    assert "transformers.AutoModel.from_pretrained" in card
    assert "AutoModelForCausalLM" not in card
    assert "### Evaluation `retrieval`: retrieval MRR / recall@1" in card
    metrics = read_json(project.parent / "out" / "evals" / "retrieval" / "metrics.json")
    m = metrics["fuse:sum"]["arith"]
    assert f"{m['mrr']:.4f} / {m['recall@1']:.4f}" in card


def test_a_loss_eval_of_an_encoder_is_refused_at_plan_time(project: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "graftbuild.toml"
    shutil.copytree(project.parent / "models", tmp_path / "models")
    retrieval_file(tmp_path / "retrieval.jsonl")
    recipe.write_text(
        RECIPE.replace(
            'data = { arith = "retrieval.jsonl" }',
            f'data = {{ arith = "retrieval.jsonl", general = "{DATA}/general.heldout.txt" }}',
        )
    )
    with pytest.raises(UserError, match=r"eval:retrieval: base is an encoder.*\['general'\]"):
        plan(recipe)
