"""Issue 22: the seeded-sparse codec, the loss-aware allocator's floors, and budgets that bound
the whole pack file (header included)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA, make_base, make_source

from graftbuild.compress.budget import (
    FLOOR_SHARE,
    allocate_sized,
    fp16_delta_nbytes,
    loss_aware_profile,
    seeded,
    uniform_floors,
    uniform_split,
)
from graftbuild.compress.codecs import get_codec, parse_spec
from graftbuild.compress.codecs.sparse import seeded_mask, threshold_of
from graftbuild.compress.roles import classify
from graftbuild.recipe import CompressionProfile
from graftbuild.skillpack import PackReader
from graftbuild.skillpack.format import PACK_FILE
from graftbuild.skillpack.report import pack_report
from graftbuild.steps.base import StepContext
from graftbuild.steps.pack import PackStep

REPO = Path(__file__).resolve().parents[1]
CALIB = REPO / "recipes" / "quickstart" / "data" / "general.train.txt"


def _delta(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return 0.01 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(200, 300), (4097,), (3, 40, 50)])
def test_sparse_round_trips(shape: tuple[int, ...]) -> None:
    delta = _delta(shape)
    codec, params = parse_spec({"method": "sparse", "keep": 0.2, "seed": 3})
    enc = codec.encode(delta, params)
    n = delta.numel()
    kept = enc.meta["kept"]
    assert set(enc.parts) == {"values"}  # no indices stored
    assert abs(kept - 0.2 * n) <= 5 * math.sqrt(0.2 * 0.8 * n)
    assert enc.nbytes == 2 * kept == codec.expected_nbytes(enc.meta, shape)
    out = codec.decode(enc.parts, enc.meta, shape)
    mask = seeded_mask(3, n, threshold_of(0.2)).reshape(shape)
    # Kept entries come back as their float16 value × n / kept, every other entry is zero.
    expected = torch.where(mask, delta.half().float() * (n / kept), torch.zeros(()))
    assert torch.allclose(out, expected, rtol=1e-6, atol=0)
    assert int((out != 0).sum()) == kept
    # Another seed keeps another subset; without rescaling the values are the delta's own.
    other = codec.encode(delta, parse_spec({"method": "sparse", "keep": 0.2, "seed": 4})[1])
    assert not torch.equal(codec.decode(other.parts, other.meta, shape) != 0, out != 0)
    plain = codec.encode(delta, parse_spec({"method": "sparse", "keep": 0.2, "rescale": False})[1])
    decoded = codec.decode(plain.parts, plain.meta, shape)
    assert torch.equal(decoded[decoded != 0], delta.half().float()[decoded != 0])


def test_sparse_keeps_the_delta_in_expectation() -> None:
    """Rescaled, the mean of many seeds' decodes approaches the delta (DARE's unbiasedness)."""
    delta = _delta((64, 64), seed=1)
    codec = get_codec("sparse")
    total = torch.zeros_like(delta)
    for seed in range(200):
        enc = codec.encode(delta, parse_spec({"method": "sparse", "keep": 0.25, "seed": seed})[1])
        total += codec.decode(enc.parts, enc.meta, (64, 64))
    err = float((total / 200 - delta).norm() / delta.norm())
    assert err < 0.15, err  # one seed alone: sqrt((1 - p) / p) ≈ 1.7


def test_sparse_bytes_identical_across_thread_counts() -> None:
    # > 2**22 entries: the mask is made in several chunks
    delta = _delta((2100, 2100), seed=2)
    codec, params = parse_spec({"method": "sparse", "keep": 0.05, "seed": 11})
    threads = torch.get_num_threads()
    digests = []
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            enc = codec.encode(delta, params)
            out = codec.decode(enc.parts, enc.meta, tuple(delta.shape))
            h = hashlib.sha256(enc.parts["values"].numpy().tobytes())
            h.update(repr(sorted(enc.meta.items())).encode())
            h.update(out.numpy().tobytes())
            digests.append(h.hexdigest())
    finally:
        torch.set_num_threads(threads)
    assert len(set(digests)) == 1


def test_tensor_seeds_differ_and_are_stable() -> None:
    spec = {"method": "sparse", "keep": 0.1, "seed": 0, "rescale": True, "dtype": "float16"}
    a, b = seeded("layers.0.mlp.up_proj.weight", spec), seeded("layers.1.mlp.up_proj.weight", spec)
    assert a["seed"] != b["seed"] and a == seeded("layers.0.mlp.up_proj.weight", spec)
    assert seeded("x", {"method": "lowrank", "rank": 2}) == {"method": "lowrank", "rank": 2}


def _profiles(sensitivity: dict[str, float] | None) -> list:
    gen = torch.Generator().manual_seed(0)
    deltas = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=gen),
        "model.layers.0.mlp.up_proj.weight": torch.randn(128, 64, generator=gen),
        "model.layers.1.mlp.down_proj.weight": torch.randn(64, 128, generator=gen),
        "model.layers.0.input_layernorm.weight": torch.randn(64, generator=gen),
    }
    profile = CompressionProfile.model_validate({"attn": {"method": "lowrank"}}).normalised()
    return [
        loss_aware_profile(
            name,
            d,
            profile[classify(name, d.ndim)],
            None,
            None if sensitivity is None else sensitivity.get(name, 1.0),
            ["sparse", "lowrank"],
        )
        for name, d in deltas.items()
    ]


def test_allocator_never_starves_a_tensor_below_its_floor() -> None:
    starved = "model.layers.0.mlp.up_proj.weight"
    sens = {starved: 1e-12}  # a tensor the loss barely notices
    profiles = _profiles(sens)
    target = fp16_delta_nbytes([p.shape for p in profiles]) // 16
    floors = uniform_floors(profiles, target, FLOOR_SHARE)
    with_floor = allocate_sized(profiles, target, floors)
    without = allocate_sized(_profiles(sens), target)
    assert set(floors) == {p.name for p in profiles if len(p.shape) == 2}
    for name, floor in floors.items():
        assert with_floor[name][0] >= floor, (name, with_floor[name][0], floor)
    assert without[starved][0] < floors[starved]  # the floor is what keeps it
    assert sum(b for b, _ in with_floor.values()) <= target
    # The heavy tensors get more than their uniform share when another tensor weighs nothing.
    uniform = uniform_split(_profiles(None), target)
    assert uniform.keys() == with_floor.keys()


@pytest.fixture(scope="module")
def medium_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama big enough that 1/128 of its delta is more than its pack's header."""
    root = tmp_path_factory.mktemp("medium")
    config = dict(
        TINY_LLAMA,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=1,
        num_key_value_heads=4,
    )
    make_base(root / "base", config=config)
    make_source(root / "x", root / "base", seed=1)
    return root


def _pack(models: Path, out: Path, options: dict) -> Path:
    profile = CompressionProfile.model_validate(options)
    out.mkdir(parents=True, exist_ok=True)
    ctx = StepContext(
        node_id="pack:x",
        config={"profile": profile.normalised()},
        inputs={"base": models / "base", "source": models / "x"},
        input_hashes={"base": "b", "source": "s"},
        files={"calibration": CALIB},
        out=out,
    )
    PackStep().run(ctx)
    return out / PACK_FILE


@pytest.mark.parametrize(
    ("budget", "options"),
    [
        (1 / 4, {}),
        (1 / 128, {}),
        (
            1 / 32,
            {
                "calibration": {"data": CALIB, "samples": 4, "seq_len": 32},
                "mix": ["sparse", "lowrank", "mixed"],
            },
        ),
    ],
)
def test_pack_file_within_five_percent_of_its_budget(
    medium_models: Path, tmp_path: Path, budget: float, options: dict
) -> None:
    path = _pack(medium_models, tmp_path / "p", {**options, "budget": budget})
    with PackReader(path) as r:
        fp16 = fp16_delta_nbytes([tuple(e["shape"]) for e in r.entries.values()])
        header = path.stat().st_size - r.payload_nbytes()
        codecs = {e["codec"] for e in r.entries.values()}
    size = path.stat().st_size
    assert abs(size - budget * fp16) <= 0.05 * budget * fp16, (size, budget * fp16, header)
    assert header > 0.02 * size or budget > 1 / 64  # the header is a real share at small budgets
    report = pack_report(path, None, None)  # what `graftbuild inspect` shows
    assert report["header_bytes"] == header and report["payload_bytes"] + header == size
    assert abs(report["file_vs_budget"] - 1) <= 0.05
    if options.get("mix"):
        assert codecs - {"exact", "prune"}  # matrices took the mix's codecs


def test_a_budget_pack_decomposes_each_matrix_once_and_keeps_its_bytes(
    medium_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With calibration a budget pack asks for each matrix's SVD 4 times (rate model, the two
    candidate allocations, the pack): ``svd_memo`` computes it once, with the same bytes."""
    import graftbuild.compress.codecs._common as common

    calls: list[tuple[int, ...]] = []
    real = torch.linalg.svd

    def counting(x: torch.Tensor, *args: object, **kwargs: object) -> object:
        calls.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", counting)
    options = {"calibration": {"data": CALIB, "samples": 4, "seq_len": 32}, "budget": 1 / 32}
    memo = _pack(medium_models, tmp_path / "memo", options).read_bytes()
    with PackReader(tmp_path / "memo" / PACK_FILE) as r:
        mixed = [tuple(e["shape"]) for e in r.entries.values() if e["codec"] == "mixed"]
    # (other SVDs: the small projections of randomized SVDs, the header estimate's probes)
    once = sorted(c for c in calls if c in mixed)
    assert len(mixed) >= 3 and once == sorted(mixed)  # every mixed matrix decomposed once
    calls.clear()
    monkeypatch.setattr(common, "SVD_MEMO_BYTES", 0)  # nothing fits: every SVD recomputed
    plain = _pack(medium_models, tmp_path / "plain", options).read_bytes()
    assert len([c for c in calls if c in mixed]) >= 3 * len(once)
    assert memo == plain
    assert not common._MEMO.items  # dropped when the pack step ends


def test_budget_packs_key_the_allocator_and_others_do_not() -> None:
    from graftbuild.steps.pack import BUDGET_ALLOCATOR_VERSION, codec_components

    plain = codec_components(CompressionProfile().normalised())
    assert not any(k.startswith("allocator") for k in plain)
    budget = codec_components(
        CompressionProfile.model_validate({"budget": 0.1, "mix": ["sparse"]}).normalised()
    )
    assert budget["allocator:budget"] == BUDGET_ALLOCATOR_VERSION
    assert "codec:sparse" in budget


# --- quality targets -------------------------------------------------------------------------

TARGET_RECIPE = """
[project]
name = "t"
cache = "cache"

[base]
path = "models/base"

[compression.q]
target = {{ keep = {keep}, data = "heldout.txt", samples = 4, seq_len = 32, evaluations = 3 }}
budget = {budget}

[sources.x]
path = "models/x"
compression = "q"
"""


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny base and a real fine-tune of it on text (it lowers the held-out loss)."""
    from transformers import AutoModelForCausalLM

    from graftbuild.weights.modeling import load_tokenizer
    from graftbuild.weights.textdata import read_examples, token_chunks

    root = tmp_path_factory.mktemp("tuned")
    make_base(root / "models" / "base")
    model = AutoModelForCausalLM.from_pretrained(str(root / "models" / "base"))
    tok = load_tokenizer(root / "models" / "base")
    data = token_chunks(tok, read_examples(CALIB), 32, CALIB)[:64]
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(20):
        batch = data[(step * 8) % 64 : (step * 8) % 64 + 8]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(root / "models" / "x"))
    for f in (root / "models" / "base").iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".model"):
            (root / "models" / "x" / f.name).write_bytes(f.read_bytes())
    (root / "heldout.txt").write_text(
        (REPO / "recipes" / "quickstart" / "data" / "general.heldout.txt").read_text()
    )
    return root


def test_a_quality_target_builds_the_smallest_pack_that_keeps_it(tuned: Path) -> None:
    from helpers import make

    recipe = tuned / "graftbuild.toml"
    recipe.write_text(TARGET_RECIPE.format(keep=0.2, budget=0.5))  # tiny: the header is most
    make(recipe, ["pack:x"])
    with PackReader(tuned / "out" / "packs" / "x" / PACK_FILE) as r:
        target = r.header["target"]
    evals = target["evaluations"]
    assert 2 <= len(evals) <= 3 and target["keep"] == 0.2
    assert target["budget"] == min(e["budget"] for e in evals if e["keep"] >= 0.2)
    assert all(e["keep"] < 0.2 for e in evals if e["budget"] < target["budget"])


def test_an_unmeetable_quality_target_fails_with_exit_1(tuned: Path) -> None:
    from click.testing import CliRunner

    from graftbuild.cli.app import main

    recipe = tuned / "graftbuild.toml"
    recipe.write_text(TARGET_RECIPE.format(keep=1.0, budget=0.004))
    result = CliRunner().invoke(main, ["make", str(recipe), "pack:x"])
    assert result.exit_code == 1, result.output
    line = " ".join(result.output.split())
    assert "pack:x: target keep = 1.0 not met: the best share" in line
    assert "at budget 0.004" in line


def test_inspect_shows_the_share_of_the_improvement_kept(tuned: Path, tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from graftbuild.cli.app import main

    models = tuned / "models"
    shares = {}
    for label, options in (
        ("exact", {r: "exact" for r in ("embed", "head", "attn", "mlp")}),
        ("lossy", {"budget": 0.3}),
    ):
        path = _pack(models, tmp_path / label, options)
        args = ["inspect", str(path), "--base", str(models / "base"), "--source", str(models / "x")]
        result = CliRunner().invoke(
            main, [*args, "--heldout", str(tuned / "heldout.txt"), "--json"]
        )
        assert result.exit_code == 0, result.output
        held = json.loads(result.stdout)["heldout"]
        assert held["loss_source"] < held["loss_base"]
        shares[label] = held["keep"]
    assert shares["exact"] == pytest.approx(1.0, abs=1e-3)  # the exact graft is the source
    assert shares["lossy"] < shares["exact"]
