"""Codecs and quantisation: exactness, error bounds, monotone budgets, sizes, determinism."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from graftbuild.compress.codecs import CODECS, get_codec, parse_spec
from graftbuild.compress.quant import dequantize, quantize_rtn
from graftbuild.compress.quant import n_groups as quant_groups

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def structured(m: int, n: int, seed: int, rank: int = 12, noise: float = 0.3) -> torch.Tensor:
    """Low rank with a decaying spectrum plus dense noise (Frobenius ``noise``), like a delta."""
    gen = torch.Generator().manual_seed(seed)
    rank = min(rank, m, n)
    u = torch.linalg.qr(torch.randn(m, rank, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(n, rank, generator=gen))[0]
    s = torch.logspace(0, -1.5, rank)
    return (u * s) @ v.T + noise * torch.randn(m, n, generator=gen) / (m * n) ** 0.5


def roundtrip(spec: dict[str, Any], delta: torch.Tensor) -> tuple[torch.Tensor, Any, Any]:
    codec, params = parse_spec(spec)
    enc = codec.encode(delta, params)
    for t in enc.parts.values():
        assert t.device.type == "cpu" and t.is_contiguous()
    out = codec.decode(enc.parts, enc.meta, tuple(delta.shape))
    assert out.dtype == torch.float32 and out.shape == delta.shape
    return out, enc, codec


def rel_err(spec: dict[str, Any], delta: torch.Tensor) -> float:
    out, _, _ = roundtrip(spec, delta)
    return float((out - delta).norm() / delta.norm())


def non_increasing(errors: list[float], slack: float = 1e-6) -> bool:
    return all(b <= a + slack for a, b in pairwise(errors))


# --- quantisation -----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 70),
    bits=st.sampled_from([1, 2, 3, 4, 5, 8]),
    group=st.integers(1, 80),
    magnitude=st.sampled_from([1e-4, 1.0, 300.0]),
    offset=st.sampled_from([0.0, 5.0, -1000.0]),
    seed=st.integers(0, 2**16),
)
def test_quant_error_within_half_step(
    rows: int, cols: int, bits: int, group: int, magnitude: float, offset: float, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = offset + magnitude * torch.randn(rows, cols, generator=gen)
    q = quantize_rtn(x, bits, group)
    g = min(group, cols)
    assert q.group_size == g and q.shape == (rows, cols)
    assert q.scale.dtype == q.zero.dtype == torch.float16
    assert q.scale.shape == q.zero.shape == (rows, quant_groups(cols, group))
    assert q.codes.numel() == (rows * cols * bits + 7) // 8
    y = dequantize(q)
    scale = q.scale.float().repeat_interleave(g, dim=1)[:, :cols]
    tol = 1e-6 * (x.abs() + 1)
    assert ((y - x).abs() <= scale / 2 + tol).all()


def test_quant_reconstruction_formula_and_code_range() -> None:
    from graftbuild.compress.bitpack import unpack_bits

    x = structured(6, 50, seed=1)
    q = quantize_rtn(x, 3, 16)
    codes = unpack_bits(q.codes, 3, 300).view(6, 50).float()
    assert codes.min() >= 0 and codes.max() <= 7
    expand = lambda t: t.float().repeat_interleave(16, dim=1)[:, :50]  # noqa: E731
    assert torch.equal(dequantize(q), expand(q.zero) + codes * expand(q.scale))


def test_quant_constant_groups() -> None:
    x = torch.tensor([[0.5] * 10 + [3.0] * 10, [0.0] * 20])
    q = quantize_rtn(x, 2, 10)
    assert (q.scale == 0).all()
    assert torch.equal(dequantize(q), x)


def test_quant_refuses_out_of_range() -> None:
    with pytest.raises(ValueError, match="float16"):
        quantize_rtn(torch.tensor([[1e6, 0.0]]), 4, 2)


# --- exact ------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(0, 6), min_size=0, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 1000),
)
def test_exact_round_trips_bit_for_bit(shape: list[int], dtype: torch.dtype, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    delta = (torch.randn(shape, generator=gen) * 1e3).to(dtype).float()
    out, enc, codec = roundtrip({"method": "exact"}, delta)
    assert torch.equal(out.view(torch.int32), delta.view(torch.int32))
    assert codec.expected_nbytes(enc.meta, tuple(delta.shape)) == enc.nbytes


def test_exact_stores_a_float32_delta_without_copying_it() -> None:
    # A pack of a 3 GB model would otherwise copy 3 GB: the encoding holds the delta itself
    # (callers drop a delta once encoded), and copies only what it converts.
    codec, params = parse_spec({"method": "exact"})
    delta = torch.randn(4, 6)
    enc = codec.encode(delta, params)
    assert enc.parts["data"].data_ptr() == delta.data_ptr()
    half = torch.randn(4, 6).half()
    enc = codec.encode(half, params)
    assert enc.parts["data"].dtype == torch.float32
    assert torch.equal(enc.parts["data"], half.float())
    strided = torch.randn(6, 4).t()
    enc = codec.encode(strided, params)
    assert enc.parts["data"].is_contiguous() and torch.equal(enc.parts["data"], strided)


# --- budgets: more budget never means more error ----------------------------------------------

MATRIX = (96, 160)


@pytest.mark.parametrize("seed", [0, 1])
def test_prune_error_monotone_in_keep(seed: int) -> None:
    delta = structured(*MATRIX, seed=seed)
    keeps = [0.01, 0.05, 0.1, 0.3, 0.7, 1.0]
    for dtype in ("float16", "float32"):
        errors = [rel_err({"method": "prune", "keep": k, "dtype": dtype}, delta) for k in keeps]
        assert non_increasing(errors), errors
    assert rel_err({"method": "prune", "keep": 1.0, "dtype": "float32"}, delta) == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_lowrank_error_monotone_in_rank_and_energy(seed: int) -> None:
    delta = structured(*MATRIX, seed=seed)
    by_rank = [rel_err({"method": "lowrank", "rank": r}, delta) for r in (1, 2, 4, 8, 16, 40)]
    assert non_increasing(by_rank), by_rank
    energies = (0.3, 0.5, 0.8, 0.9, 0.99, 1.0)
    by_energy = [rel_err({"method": "lowrank", "energy": e}, delta) for e in energies]
    assert non_increasing(by_energy), by_energy
    capped = rel_err({"method": "lowrank", "energy": 1.0, "max_rank": 4}, delta)
    assert capped == pytest.approx(by_rank[2])


@pytest.mark.parametrize("seed", [0, 1])
def test_mixed_error_monotone_in_bits(seed: int) -> None:
    delta = structured(*MATRIX, seed=seed)
    errors = [
        rel_err({"method": "mixed", "bands": [{"rank": 24, "bits": b}], "group_size": 32}, delta)
        for b in (2, 3, 4, 8)
    ]
    assert non_increasing(errors), errors


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mixed_error_monotone_in_band_fraction(seed: int, bits: int) -> None:
    delta = structured(*MATRIX, seed=seed)
    fractions = (0.01, 0.05, 0.1, 0.3, 0.6, 1.0)
    errors = [
        rel_err({"method": "mixed", "bands": [{"fraction": f, "bits": bits}]}, delta)
        for f in fractions
    ]
    assert non_increasing(errors), errors


def test_mixed_more_bands_less_error() -> None:
    delta = structured(*MATRIX, seed=3)
    head = [{"fraction": 0.01, "bits": 8}]
    mid = [*head, {"fraction": 0.05, "bits": 4}]
    tail = [*mid, {"fraction": 0.3, "bits": 2}]
    errors = [rel_err({"method": "mixed", "bands": b}, delta) for b in (head, mid, tail)]
    assert non_increasing(errors), errors
    assert errors[-1] < 0.5


# --- sizes ------------------------------------------------------------------------------------

SPECS: list[dict[str, Any]] = [
    {"method": "exact"},
    {"method": "prune", "keep": 0.1},
    {"method": "prune", "keep": 0.3, "dtype": "bfloat16"},
    {"method": "lowrank"},
    {"method": "lowrank", "rank": 5, "dtype": "float32"},
    {"method": "mixed"},
    {
        "method": "mixed",
        "bands": [{"rank": 3, "bits": 8}, {"rank": 9, "bits": 3}],
        "group_size": 48,
    },
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: str(s)[:50])
@pytest.mark.parametrize("shape", [(96, 160), (160, 96), (7,), (2, 3, 4)])
def test_expected_nbytes_matches_parts_and_shape_kept(spec: dict[str, Any], shape: tuple) -> None:
    gen = torch.Generator().manual_seed(0)
    delta = structured(*shape, seed=5) if len(shape) == 2 else torch.randn(shape, generator=gen)
    out, enc, codec = roundtrip(spec, delta)
    assert codec.expected_nbytes(enc.meta, tuple(delta.shape)) == enc.nbytes
    if len(shape) != 2 and spec["method"] in ("lowrank", "mixed"):
        assert enc.meta == {"fallback": "exact"}
        assert torch.equal(out, delta)


def test_mixed_size_reflects_bits() -> None:
    delta = structured(128, 256, seed=0)
    sizes = {}
    for bits in (2, 3, 4, 8):
        _, enc, codec = roundtrip({"method": "mixed", "bands": [{"rank": 32, "bits": bits}]}, delta)
        sizes[bits] = codec.expected_nbytes(enc.meta, (128, 256))
        codes = sum(t.numel() for k, t in enc.parts.items() if k.endswith(".codes"))
        assert codes == (32 * 128 * bits + 7) // 8 + (32 * 256 * bits + 7) // 8
    scales = 4 * 32 + 2 * 2 * 32 * (1 + 2)  # sigma + float16 scale/zero per group of 128
    for bits, size in sizes.items():
        assert size - scales == (32 * 128 * bits + 7) // 8 + (32 * 256 * bits + 7) // 8


def test_falls_back_to_exact_when_the_code_is_bigger() -> None:
    delta = structured(8, 8, seed=0, rank=8, noise=0.5)
    _, enc, _ = roundtrip({"method": "lowrank", "energy": 1.0, "dtype": "float32"}, delta)
    assert enc.meta == {"fallback": "exact"}
    _, enc, _ = roundtrip({"method": "lowrank", "rank": 2}, delta)
    assert enc.meta["rank"] == 2
    # mixed: 2 x 3 codes with float16 scales and a float32 sigma outweigh 24 bytes of float32.
    tiny = torch.arange(6.0).view(2, 3)
    out, enc, _ = roundtrip({"method": "mixed"}, tiny)
    assert enc.meta == {"fallback": "exact"} and torch.equal(out, tiny)


def test_mixed_band_ranks_truncate_at_min_dim() -> None:
    delta = structured(20, 40, seed=0)
    bands = [{"rank": 15, "bits": 8}, {"fraction": 0.5, "bits": 4}, {"rank": 3, "bits": 2}]
    _, enc, _ = roundtrip({"method": "mixed", "bands": bands}, delta)
    assert enc.meta["bands"] == [{"rank": 15, "bits": 8}, {"rank": 5, "bits": 4}]
    assert enc.parts["sigma"].shape == (20,)


def test_prune_keeps_largest_ties_to_lowest_index() -> None:
    delta = torch.tensor([[1.0, -3.0, 2.0, 2.0], [-2.0, 0.5, 2.0, 0.0]])
    _, enc, _ = roundtrip({"method": "prune", "keep": 0.5, "dtype": "float32"}, delta)
    assert enc.parts["indices"].dtype == torch.int32
    assert enc.parts["indices"].tolist() == [1, 2, 3, 4]
    assert enc.parts["values"].tolist() == [-3.0, 2.0, 2.0, -2.0]
    _, enc, _ = roundtrip({"method": "prune", "keep": 1e-9}, delta)
    assert enc.meta["kept"] == 1


# --- determinism and signs --------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: str(s)[:50])
def test_deterministic(spec: dict[str, Any]) -> None:
    delta = structured(64, 48, seed=7)
    _, a, _ = roundtrip(spec, delta)
    _, b, _ = roundtrip(spec, delta.clone())
    assert a.meta == b.meta and a.parts.keys() == b.parts.keys()
    for k in a.parts:
        assert torch.equal(a.parts[k], b.parts[k])


def test_svd_signs_are_canonical() -> None:
    delta = structured(30, 20, seed=2)
    _, pos, _ = roundtrip({"method": "lowrank", "rank": 4, "dtype": "float32"}, delta)
    a = pos.parts["a"]
    pivots = a.gather(0, a.abs().argmax(dim=0, keepdim=True))
    assert (pivots > 0).all()


def test_mixed_uses_gptq_only_with_calibration() -> None:
    from graftbuild.compress.gptq import Calibration

    delta = structured(32, 48, seed=0)
    codec, params = parse_spec({"method": "mixed", "bands": [{"rank": 8, "bits": 3}]})
    plain = codec.encode(delta, params)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 48, generator=gen) @ torch.randn(48, 48, generator=gen)
    calibrated = codec.encode(delta, params, calibration=Calibration(x.T @ x / 200))  # type: ignore[call-arg]
    assert plain.meta["quantizer"] == "rtn" and calibrated.meta["quantizer"] == "gptq"
    assert {k: v for k, v in plain.meta.items() if k != "quantizer"} == {
        k: v for k, v in calibrated.meta.items() if k != "quantizer"
    }
    assert plain.parts.keys() == calibrated.parts.keys()
    for k in plain.parts:  # same layout, different codes
        assert plain.parts[k].shape == calibrated.parts[k].shape
    assert not torch.equal(plain.parts["b0.v.codes"], calibrated.parts["b0.v.codes"])
    assert codec.expected_nbytes(calibrated.meta, (32, 48)) == calibrated.nbytes


# --- properties over every codec --------------------------------------------------------------

# Budget ladders per codec, smallest first: more of the budget must never mean more error.
LADDERS: dict[str, list[dict[str, Any]]] = {
    "exact": [{"method": "exact"}],
    "prune": [{"method": "prune", "keep": k, "dtype": "float32"} for k in (0.02, 0.1, 0.4, 1.0)],
    # one seed: the kept sets are nested (kept iff hash < keep · 2³²); not rescaled, so exact
    "sparse": [
        {"method": "sparse", "keep": k, "rescale": False, "dtype": "float32"}
        for k in (0.02, 0.1, 0.4, 1.0)
    ],
    "lowrank": [{"method": "lowrank", "rank": r, "dtype": "float32"} for r in (1, 3, 8, 20)],
    "mixed": [
        {"method": "mixed", "bands": [{"rank": r, "bits": b}], "group_size": 16}
        for r, b in ((1, 8), (3, 8), (8, 8), (20, 8))
    ]
    + [
        {
            "method": "mixed",
            "bands": [{"rank": 20, "bits": 8}, {"rank": 40, "bits": b}],
            "group_size": 16,
        }
        for b in (2, 4, 8)
    ],
}


def test_every_codec_has_a_ladder() -> None:
    # `zero` has no ladder: it encodes an all-zero delta only (test_zero_codec below)
    assert set(LADDERS) | {"zero"} == set(CODECS)


def test_zero_codec_stores_no_data_and_refuses_a_nonzero_delta() -> None:
    codec, params = parse_spec({"method": "zero"})
    enc = codec.encode(torch.zeros(6, 4), params)
    assert enc.parts == {} and enc.nbytes == 0 == codec.expected_nbytes(enc.meta, (6, 4))
    assert torch.equal(codec.decode({}, enc.meta, (6, 4)), torch.zeros(6, 4))
    with pytest.raises(ValueError, match="all-zero"):
        codec.encode(torch.eye(3), params)


@settings(max_examples=25, deadline=None)
@given(
    method=st.sampled_from(sorted(LADDERS)),
    m=st.integers(20, 60),
    n=st.integers(20, 60),
    rank=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_error_never_rises_with_the_budget(
    method: str, m: int, n: int, rank: int, seed: int
) -> None:
    delta = structured(m, n, seed=seed, rank=rank)
    errors = [rel_err(spec, delta) for spec in LADDERS[method]]
    # Quantisation noise of a larger band may exceed by float rounding only.
    assert non_increasing(errors, slack=1e-5), errors


@settings(max_examples=40, deadline=None)
@given(
    spec=st.sampled_from([ladder[-1] for ladder in LADDERS.values()] + SPECS),
    shape=st.lists(st.integers(1, 24), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_shapes_and_dtypes_are_preserved(
    spec: dict[str, Any], shape: list[int], dtype: torch.dtype, seed: int, tmp_path_factory: Any
) -> None:
    """Any codec, any shape, weights in fp32 / fp16 / bf16: the pack records the weight dtype and
    decodes a float32 delta of the same shape (cast back to the weight dtype when fused)."""
    from graftbuild.skillpack import PackReader, PackWriter, encode_tensor

    gen = torch.Generator().manual_seed(seed)
    delta = (torch.randn(shape, generator=gen) * 0.01).to(dtype).float()
    path = tmp_path_factory.mktemp("p") / "p.safetensors"
    with PackWriter(path, {}) as writer:
        codec, params, enc = encode_tensor(delta.to(dtype), spec)
        writer.add("w", "other", codec, params, delta.shape, str(dtype), enc)
    with PackReader(path) as reader:
        assert reader.entries["w"]["dtype"] == str(dtype).removeprefix("torch.")
        out = reader.decode("w")
    assert out.dtype == torch.float32 and tuple(out.shape) == tuple(shape)
    if spec["method"] == "exact":
        assert torch.equal(out.to(dtype), delta.to(dtype))


# --- specs ------------------------------------------------------------------------------------


def test_registry_and_defaults() -> None:
    assert set(CODECS) == {"exact", "prune", "lowrank", "mixed", "sparse", "zero"}
    assert get_codec("mixed").name == "mixed"
    _, p = parse_spec({"method": "lowrank"})
    assert p.model_dump() == {"energy": 0.9, "rank": None, "max_rank": None, "dtype": "float16"}
    _, p = parse_spec({"method": "mixed"})
    dumped = p.model_dump(mode="json")
    assert [(b["fraction"], b["bits"]) for b in dumped["bands"]] == [(0.01, 8), (0.05, 4), (0.3, 2)]
    assert dumped["group_size"] == 128
    # Normalised params validate back to themselves (what a pack stores is re-readable).
    assert get_codec("mixed").Params.model_validate(dumped).model_dump(mode="json") == dumped
    _, p = parse_spec({"method": "lowrank", "rank": 4})
    again = get_codec("lowrank").Params.model_validate(p.model_dump())
    assert again.rank == 4 and again.energy is None


@pytest.mark.parametrize(
    "spec",
    [
        {"method": "prune"},
        {"method": "prune", "keep": 0},
        {"method": "prune", "keep": 1.5},
        {"method": "prune", "keep": 0.1, "dtype": "int8"},
        {"method": "prune", "keep": 0.1, "typo": 1},
        {"method": "exact", "keep": 0.1},
        {"method": "lowrank", "energy": 0.9, "rank": 4},
        {"method": "lowrank", "rank": 0},
        {"method": "mixed", "bands": []},
        {"method": "mixed", "bands": [{"bits": 4}]},
        {"method": "mixed", "bands": [{"fraction": 0.1, "rank": 2, "bits": 4}]},
        {"method": "mixed", "bands": [{"fraction": 0.1, "bits": 5}]},
        {"method": "mixed", "group_size": 0},
    ],
)
def test_bad_params_are_validation_errors(spec: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        parse_spec(spec)


def test_unknown_method_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="known methods: exact, lowrank, mixed, prune"):
        parse_spec({"method": "svd"})
    with pytest.raises(ValueError, match="needs a 'method'"):
        parse_spec({"keep": 0.1})
