"""Size budgets: the allocator's packs land within 5% of their budget; calibration in the key."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, write_recipe
from helpers import make, plan
from hypothesis import given, settings
from hypothesis import strategies as st

from graftbuild.compress.budget import allocate, fp16_delta_nbytes, rate_profile
from graftbuild.compress.roles import classify
from graftbuild.errors import UserError
from graftbuild.recipe import CompressionProfile, load_recipe
from graftbuild.skillpack import PackReader, encode_tensor

CALIB = REPO / "recipes" / "quickstart" / "data" / "general.train.txt"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fake_deltas() -> dict[str, torch.Tensor]:
    """A small model's worth of deltas with different spectra and magnitudes."""
    gen = torch.Generator().manual_seed(0)

    def low(m: int, n: int, r: int, scale: float) -> torch.Tensor:
        a = torch.randn(m, r, generator=gen) @ torch.randn(r, n, generator=gen) / r
        return scale * (a + 0.2 * torch.randn(m, n, generator=gen))

    return {
        "model.embed_tokens.weight": low(300, 48, 4, 0.02),
        "model.layers.0.self_attn.q_proj.weight": low(48, 48, 6, 0.05),
        "model.layers.0.mlp.up_proj.weight": low(128, 48, 10, 0.03),
        "model.layers.0.mlp.down_proj.weight": low(48, 128, 3, 0.08),
        "model.layers.0.input_layernorm.weight": 0.01 * torch.randn(48, generator=gen),
        "lm_head.weight": low(300, 48, 2, 0.04),
    }


PROFILE = CompressionProfile.model_validate({"attn": {"method": "lowrank"}}).normalised()
DELTAS = fake_deltas()
PROFILES = [rate_profile(name, d, PROFILE[classify(name, d.ndim)]) for name, d in DELTAS.items()]
FP16 = fp16_delta_nbytes([tuple(d.shape) for d in DELTAS.values()])


def encode_all(budget: float) -> tuple[int, float]:
    """(payload bytes, relative error) of the deltas encoded under the allocation."""
    specs = allocate(PROFILES, int(budget * FP16))
    nbytes, err, norm = 0, 0.0, 0.0
    for name, d in DELTAS.items():
        codec_name, _, enc = encode_tensor(d, specs[name])
        from graftbuild.compress.codecs import get_codec

        out = get_codec(codec_name).decode(enc.parts, enc.meta, tuple(d.shape))
        nbytes += enc.nbytes
        err += float((out - d).pow(2).sum())
        norm += float(d.pow(2).sum())
    return nbytes, (err / norm) ** 0.5


@settings(max_examples=12, deadline=None)
@given(budget=st.floats(1 / 64, 1 / 4))
def test_allocation_lands_within_five_percent(budget: float) -> None:
    nbytes, _ = encode_all(budget)
    assert abs(nbytes - budget * FP16) <= 0.05 * budget * FP16, (nbytes, budget * FP16)


def test_error_falls_as_the_budget_rises() -> None:
    errors = [encode_all(b)[1] for b in (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4)]
    assert all(b < a for a, b in itertools.pairwise(errors)), errors


def test_allocation_keeps_each_roles_method_and_forms_bands() -> None:
    specs = allocate(PROFILES, int(FP16 / 16))
    assert specs["model.embed_tokens.weight"]["method"] == "prune"
    assert specs["model.layers.0.self_attn.q_proj.weight"]["method"] == "lowrank"
    assert specs["model.layers.0.input_layernorm.weight"]["method"] == "exact"
    bands = specs["model.layers.0.mlp.up_proj.weight"]["bands"]
    assert all(b["rank"] >= 1 for b in bands)
    # The profile's bands (1 % / 5 % / 30 % at 8 / 4 / 2 bits) give the shape: bits in order.
    bits = [b["bits"] for b in bands]
    assert bits == [b for b in (8, 4, 2) if b in bits]
    # More budget: never less rank for any tensor.
    bigger = allocate(PROFILES, int(FP16 / 4))
    for name, spec in specs.items():
        if spec["method"] == "mixed":
            rank = sum(b["rank"] for b in spec["bands"])
            assert sum(b["rank"] for b in bigger[name]["bands"]) >= rank
        elif spec["method"] == "lowrank":
            assert bigger[name]["rank"] >= spec["rank"]
        elif spec["method"] == "prune":
            assert bigger[name]["keep"] >= spec["keep"]


# --- in a real build ----------------------------------------------------------------------------

RECIPE = """
[project]
name = "t"
cache = "cache"

[base]
path = "models/base"

[compression.small]
attn = { method = "mixed" }
budget = 0.25
calibration = { data = "calib.txt", samples = 8, seq_len = 32 }

[compression.rtn]
attn = { method = "mixed" }
budget = 0.25

[sources.x]
path = "models/x"
compression = "small"

[sources.y]
path = "models/x"
compression = "rtn"
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, model_folders: Path) -> Path:
    """A project whose packs x (GPTQ) and y (RTN) have a budget; built once for the module."""
    root = tmp_path_factory.mktemp("budget")
    shutil.copytree(model_folders, root / "models")
    shutil.copyfile(CALIB, root / "calib.txt")
    recipe = write_recipe(root / "graftbuild.toml", RECIPE)
    make(recipe, ["pack:x", "pack:y"])
    return recipe


def test_built_packs_land_within_five_percent(built: Path) -> None:
    # The budget bounds the whole file: on these tiny models the header is most of it.
    for name in ("x", "y"):
        path = built.parent / "out" / "packs" / name / "skillpack.safetensors"
        with PackReader(path) as r:
            fp16 = fp16_delta_nbytes([tuple(e["shape"]) for e in r.entries.values()])
            assert abs(path.stat().st_size - fp16 / 4) <= 0.05 * fp16 / 4
            assert r.header["budget"] == 0.25
            if name == "x":  # calibrated: the allocation with the lower calibration loss
                alloc = r.header["allocation"]
                losses = alloc["calibration_loss"]
                assert set(losses) == {"loss-aware", "uniform"}
                assert losses[alloc["chosen"]] == min(losses.values())
            else:
                assert "allocation" not in r.header
            quantizers = {e["meta"].get("quantizer") for e in r.entries.values()}
            assert quantizers == {None, "gptq" if name == "x" else "rtn"}


def test_calibration_is_part_of_the_key(built: Path) -> None:
    root = built.parent
    assert plan(built)["pack:x"].state == "fresh"
    with (root / "calib.txt").open("a") as f:
        f.write("one more line of calibration text\n")
    # The whole file is hashed, as for any declared input, even if only its start is used.
    nodes = plan(built)
    assert nodes["pack:x"].state == "stale" and nodes["pack:y"].state == "fresh"
    assert any("calibration data" in r for r in nodes["pack:x"].reasons)
    shutil.copyfile(CALIB, root / "calib.txt")
    assert plan(built)["pack:x"].state == "fresh"
    (root / "graftbuild.toml").write_text(RECIPE.replace("samples = 8", "samples = 9"))
    nodes = plan(built)
    assert nodes["pack:x"].state == "stale" and nodes["pack:y"].state == "fresh"
    (root / "graftbuild.toml").write_text(RECIPE)


def test_profile_without_options_keeps_old_keys() -> None:
    assert "budget" not in CompressionProfile().normalised()
    assert "calibration" not in CompressionProfile().normalised()


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        ("budget = 1.5", "budget"),
        ("budget = 0", "budget"),
        ('calibration = { data = "calib.txt", sample = 3 }', "sample"),
        ("calibration = { samples = 3 }", "data"),
    ],
)
def test_bad_profiles_are_user_errors(tmp_path: Path, profile: str, message: str) -> None:
    body = f"""
[project]
name = "t"
[base]
path = "models/base"
[compression.p]
{profile}
[sources.x]
path = "models/x"
compression = "p"
"""
    with pytest.raises(UserError, match=message):
        load_recipe(write_recipe(tmp_path / "graftbuild.toml", body))


def test_too_little_calibration_text_is_a_user_error(tmp_path: Path, model_folders: Path) -> None:
    shutil.copytree(model_folders, tmp_path / "models")
    (tmp_path / "calib.txt").write_text("a few words of text, " * 6 + "\n")
    recipe = write_recipe(tmp_path / "graftbuild.toml", RECIPE)
    with pytest.raises(UserError, match="calibration needs 8 samples"):
        make(recipe, ["pack:x"])
