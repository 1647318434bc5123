"""Bit-packing: exact round trips, exact lengths, and the documented little-endian bit order."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graftbuild.compress.bitpack import pack_bits, packed_nbytes, unpack_bits


@st.composite
def codes_and_bits(draw: st.DrawFn) -> tuple[list[int], int]:
    bits = draw(st.integers(1, 8))
    codes = draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=300))
    return codes, bits


@settings(max_examples=150, deadline=None)
@given(codes_and_bits())
def test_round_trip_and_exact_length(case: tuple[list[int], int]) -> None:
    codes, bits = case
    values = torch.tensor(codes, dtype=torch.uint8)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.ndim == 1 and packed.is_contiguous()
    assert packed.numel() == (len(codes) * bits + 7) // 8 == packed_nbytes(len(codes), bits)
    assert torch.equal(unpack_bits(packed, bits, len(codes)), values)


@pytest.mark.parametrize("bits", range(1, 9))
def test_any_shape_is_flattened(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 1 << bits, (3, 5, 7), generator=gen, dtype=torch.uint8)
    packed = pack_bits(values, bits)
    assert packed.numel() == packed_nbytes(105, bits)
    assert torch.equal(unpack_bits(packed, bits, 105), values.reshape(-1))


def test_bit_order_is_little_endian() -> None:
    assert pack_bits(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    assert pack_bits(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]
    # 3-bit: 5 = 101b in bits 0-2, 3 = 011b in bits 3-5, 7 = 111b in bits 6-8 (spills over).
    assert pack_bits(torch.tensor([5, 3, 7], dtype=torch.uint8), 3).tolist() == [0xDD, 0x01]
    assert pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 1], dtype=torch.uint8), 1).tolist() == [
        1,
        1,
    ]


def test_generic_path_matches_fast_paths() -> None:
    """The numpy path (any bits) and the shift paths (2, 4) write the same bit stream."""
    gen = torch.Generator().manual_seed(0)
    for bits in (1, 2, 4):
        values = torch.randint(0, 1 << bits, (1001,), generator=gen, dtype=torch.uint8)
        fast = pack_bits(values, bits)
        stream = [(int(v) >> b) & 1 for v in values for b in range(bits)]
        stream += [0] * (-len(stream) % 8)
        slow = [sum(stream[i + j] << j for j in range(8)) for i in range(0, len(stream), 8)]
        assert fast.tolist() == slow


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="fit in 2 bits"):
        pack_bits(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.tensor([0], dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="uint8"):
        pack_bits(torch.tensor([0], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="need"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 3, 3)


def test_deterministic() -> None:
    values = torch.arange(200, dtype=torch.uint8) % 8
    assert torch.equal(pack_bits(values, 3), pack_bits(values.clone(), 3))
