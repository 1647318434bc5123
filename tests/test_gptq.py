"""GPTQ for the mixed codec's singular vectors: output error, grids, fallbacks, determinism."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import REPO
from hypothesis import given, settings
from hypothesis import strategies as st

from graftbuild.compress.codecs import parse_spec
from graftbuild.compress.gptq import Calibration, gptq_factors, gptq_rows
from graftbuild.compress.quant import dequantize, quantize_rtn, quantize_to_grid

CALIB = REPO / "recipes" / "quickstart" / "data" / "general.train.txt"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def inputs(n: int, tokens: int, seed: int) -> torch.Tensor:
    """Correlated activations with a decaying spectrum (like a layer's inputs)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=gen) / n**0.5
    return (torch.randn(tokens, n, generator=gen) * torch.logspace(0, -2, n)) @ mix


def delta(m: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(m, 8, generator=gen) @ torch.randn(8, n, generator=gen) / 8
    return low + 0.1 * torch.randn(m, n, generator=gen)


def output_error(spec: dict, d: torch.Tensor, x: torch.Tensor, cal: Calibration | None) -> float:
    codec, params = parse_spec(spec)
    enc = codec.encode(d, params, calibration=cal)  # type: ignore[call-arg]
    out = codec.decode(enc.parts, enc.meta, tuple(d.shape))
    return float(((d - out) @ x.T).norm() / (d @ x.T).norm())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_output_error(bits: int, act_order: bool) -> None:
    """What GPTQ optimises, ‖ΔX − Δ̂X‖, is lower than round-to-nearest's on the same grid."""
    d, x = delta(64, 96, seed=bits), inputs(96, 800, seed=bits)
    spec = {"method": "mixed", "bands": [{"rank": 16, "bits": bits}], "group_size": 32}
    cal = Calibration(x.T @ x / len(x), damp=0.01, act_order=act_order)
    rtn = output_error(spec, d, x, None)
    gptq = output_error(spec, d, x, cal)
    assert gptq < 0.95 * rtn, (gptq, rtn)


def test_gptq_on_bands_of_mixed_precision() -> None:
    d, x = delta(64, 96, seed=7), inputs(96, 800, seed=7)
    spec = {"method": "mixed", "bands": [{"rank": 4, "bits": 8}, {"rank": 20, "bits": 2}]}
    cal = Calibration(x.T @ x / len(x))
    assert output_error(spec, d, x, cal) < output_error(spec, d, x, None)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 8),
    cols=st.integers(1, 40),
    bits=st.sampled_from([2, 3, 4, 8]),
    group=st.integers(1, 48),
    seed=st.integers(0, 2**16),
)
def test_identity_hessian_is_round_to_nearest(
    rows: int, cols: int, bits: int, group: int, seed: int
) -> None:
    """With uncorrelated inputs no error is worth spreading: GPTQ reduces to RTN, bit for bit."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    out = gptq_rows(w, torch.eye(cols), [bits] * rows, group, damp=0.0, act_order=False)
    assert out is not None
    q = quantize_to_grid(*out, bits, group)
    r = quantize_rtn(w, bits, group)
    assert torch.equal(q.codes, r.codes)
    assert torch.equal(q.scale, r.scale) and torch.equal(q.zero, r.zero)


def test_codes_lie_on_the_stored_grid() -> None:
    """Every reconstructed entry is zero + code × scale of its group (what decoders compute)."""
    w, x = torch.randn(6, 50), inputs(50, 300, seed=1)
    bits = [8, 8, 3, 3, 2, 2]
    for act_order in (False, True):
        out = gptq_rows(w, x.T @ x / 300, bits, 16, 0.01, act_order)
        assert out is not None
        what, scale, zero = out
        assert scale.shape == zero.shape == (6, 4) and scale.dtype == torch.float16
        for row, b in enumerate(bits):
            q = quantize_to_grid(
                what[row : row + 1], scale[row : row + 1], zero[row : row + 1], b, 16
            )
            assert torch.allclose(dequantize(q), what[row : row + 1], atol=1e-5)


def test_dead_inputs_and_zero_hessian() -> None:
    u, _ = torch.linalg.qr(torch.randn(20, 4))
    v, _ = torch.linalg.qr(torch.randn(30, 4))
    sigma = torch.tensor([4.0, 3.0, 2.0, 1.0])
    h = inputs(30, 200, seed=2)
    h = h.T @ h / 200
    h[:5] = 0
    h[:, :5] = 0  # inputs that are never active
    [(uq, vq)] = gptq_factors(u, sigma, v.T, [(4, 4)], 8, Calibration(h))
    assert torch.isfinite(dequantize(uq)).all() and torch.isfinite(dequantize(vq)).all()
    # No curvature at all: round-to-nearest.
    [(uq, vq)] = gptq_factors(u, sigma, v.T, [(4, 4)], 8, Calibration(torch.zeros(30, 30)))
    assert torch.equal(vq.codes, quantize_rtn(v.T, 4, 8).codes)
    assert torch.equal(uq.codes, quantize_rtn(u.T, 4, 8).codes)
    with pytest.raises(ValueError, match="Hessian"):
        gptq_factors(u, sigma, v.T, [(4, 4)], 8, Calibration(torch.eye(29)))


def test_deterministic() -> None:
    d, x = delta(40, 60, seed=3), inputs(60, 300, seed=3)
    codec, params = parse_spec({"method": "mixed", "group_size": 16})
    cal = Calibration(x.T @ x / 300, act_order=True)
    a = codec.encode(d, params, calibration=cal)  # type: ignore[call-arg]
    b = codec.encode(d.clone(), params, calibration=cal)  # type: ignore[call-arg]
    assert a.meta == b.meta
    assert all(torch.equal(a.parts[k], b.parts[k]) for k in a.parts)


# --- calibration statistics from the base model -------------------------------------------------


def test_statistics_match_the_layer_inputs(model_folders: Path) -> None:
    """H of a linear layer is the mean outer product of the inputs it really sees."""
    from transformers import AutoModelForCausalLM

    from graftbuild.compress.calibration import collect_statistics
    from graftbuild.weights.modeling import load_tokenizer
    from graftbuild.weights.textdata import read_examples, token_chunks

    base = model_folders / "base"
    stats = collect_statistics(base, CALIB, samples=4, seq_len=16)
    q = stats["model.layers.0.self_attn.q_proj.weight"]
    assert q.shape == (32, 32) and torch.allclose(q, q.T, atol=1e-6)
    assert torch.linalg.eigvalsh(q.double()).min() > -1e-6
    # q, k and v read the same normalised hidden states: one matrix for all three.
    assert torch.equal(q, stats["model.layers.0.self_attn.v_proj.weight"])
    assert stats["model.layers.0.mlp.down_proj.weight"].shape == (64, 64)
    assert stats["lm_head.weight"].shape == (32, 32)
    freq = stats["model.embed_tokens.weight"]
    assert freq.shape == (512,) and float(freq.sum()) == pytest.approx(1.0)

    # Independently: capture the input of up_proj with a hook and average x xᵀ.
    tok = load_tokenizer(base)
    ids = token_chunks(tok, read_examples(CALIB), 16, CALIB)[:4]
    model = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    seen: list[torch.Tensor] = []
    module = model.model.layers[1].mlp.up_proj
    handle = module.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, 32)))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    x = torch.cat(seen)
    expected = x.T @ x / len(x)
    assert torch.allclose(stats["model.layers.1.mlp.up_proj.weight"], expected, atol=1e-5)
    assert float(freq[ids.reshape(-1)].min()) > 0


def test_identity_hessian_matches_rtn_at_a_rounding_tie() -> None:
    """A case hypothesis found: one value per group sits at a rounding tie, where multiplying by
    1/scale and dividing by scale round to different codes; GPTQ must divide, as RTN does."""
    w = torch.randn(1, 24, generator=torch.Generator().manual_seed(2629))
    out = gptq_rows(w, torch.eye(24), [8], 1, damp=0.0, act_order=False)
    assert out is not None
    assert torch.equal(quantize_to_grid(*out, 8, 1).codes, quantize_rtn(w, 8, 1).codes)
