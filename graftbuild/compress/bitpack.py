"""Dense bit-packing of small unsigned integer codes.

Bit order is little-endian throughout: code ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of the
stream, its least significant bit first, and stream bit ``j`` is bit ``j % 8`` (value ``1 << (j %
8)``) of byte ``j // 8``. So 4-bit codes pack as ``byte = c0 | c1 << 4`` and 2-bit codes as
``c0 | c1 << 2 | c2 << 4 | c3 << 6``. The final byte is zero-padded. ``n`` codes of ``bits`` bits
take exactly ``ceil(n * bits / 8)`` bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

import numpy as np


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes taken by ``n`` codes of ``bits`` bits."""
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (each < 2**bits, any shape, read flattened) into a 1-D uint8 tensor."""
    import torch

    _check_bits(bits)
    if values.dtype != torch.uint8:
        raise ValueError(f"pack_bits expects uint8 codes, got {values.dtype}")
    flat = values.detach().reshape(-1).cpu()
    n = flat.numel()
    if n and bits < 8 and int(flat.max()) >= (1 << bits):
        raise ValueError(f"a code does not fit in {bits} bits (max {int(flat.max())})")
    if bits == 8:
        return flat.clone().contiguous()
    if bits in (1, 2, 4):
        per = 8 // bits
        pad = (-n) % per
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        groups = flat.view(-1, per).to(torch.int32)
        shifts = torch.arange(per, dtype=torch.int32) * bits
        return (groups << shifts).sum(dim=1).to(torch.uint8).contiguous()
    arr = flat.numpy()
    bitmat = np.unpackbits(arr[:, None], axis=1, bitorder="little")[:, :bits]
    packed = np.packbits(bitmat.reshape(-1), bitorder="little")
    return torch.from_numpy(packed.copy()).contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes as a 1-D uint8 tensor."""
    import torch

    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_bits expects uint8 bytes, got {packed.dtype}")
    flat = packed.detach().reshape(-1).cpu()
    need = packed_nbytes(n, bits)
    if flat.numel() < need:
        raise ValueError(f"{n} codes of {bits} bits need {need} bytes, got {flat.numel()}")
    flat = flat[:need]
    if bits == 8:
        return flat.clone().contiguous()
    if bits in (1, 2, 4):
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.int32) * bits
        codes = (flat.to(torch.int32)[:, None] >> shifts) & ((1 << bits) - 1)
        return codes.reshape(-1)[:n].to(torch.uint8).contiguous()
    stream = np.unpackbits(flat.numpy(), bitorder="little")[: n * bits].reshape(n, bits)
    codes = np.packbits(stream, axis=1, bitorder="little")[:, 0]
    return torch.from_numpy(codes.copy()).contiguous()
