"""Group-wise asymmetric round-to-nearest (RTN) quantisation of a 2-D tensor along its last dim.

Each row is cut into groups of ``group_size`` consecutive entries (the last group may be short).
A group stores ``zero`` (its minimum, the value of code 0) and ``scale`` (the step), both float16,
and each entry becomes ``code = round((x - zero) / scale)`` clamped to ``[0, 2**bits - 1]``, so
that ``x ≈ zero + code * scale``.

``zero`` is rounded *down* and ``scale`` *up* to float16 so the float16 grid still spans the
group's range: every entry then reconstructs within ``scale / 2`` (up to float32 rounding). A
group whose values are all equal (and exactly representable in float16) gets ``scale == 0`` and
all codes 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from graftbuild.compress.bitpack import pack_bits, packed_nbytes, unpack_bits

if TYPE_CHECKING:
    import torch

_F16_MAX = 65504.0


@dataclass
class QuantizedMatrix:
    """A quantised ``rows × cols`` matrix: packed codes and per-group float16 scale / zero."""

    codes: torch.Tensor  # 1-D uint8, rows*cols codes bit-packed row-major (see bitpack)
    scale: torch.Tensor  # float16 [rows, n_groups]
    zero: torch.Tensor  # float16 [rows, n_groups], the group minimum
    bits: int
    group_size: int  # effective group size (already clamped to cols)
    shape: tuple[int, int]


def n_groups(cols: int, group_size: int) -> int:
    """Groups per row after clamping the group size to the row length."""
    return -(-cols // effective_group_size(cols, group_size)) if cols else 0


def effective_group_size(cols: int, group_size: int) -> int:
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return max(1, min(group_size, cols))


def _step_f16(t: torch.Tensor, mask: torch.Tensor, towards: float) -> torch.Tensor:
    import torch

    target = torch.full_like(t, towards)
    return torch.where(mask, torch.nextafter(t, target), t)


def _expand(per_group: torch.Tensor, group_size: int, cols: int) -> torch.Tensor:
    return per_group.float().repeat_interleave(group_size, dim=1)[:, :cols]


def quantize_rtn(x: torch.Tensor, bits: int, group_size: int) -> QuantizedMatrix:
    """Quantise the rows of a 2-D float tensor in groups along the last dim (see module doc)."""
    import torch

    if x.ndim != 2:
        raise ValueError(f"quantize_rtn expects a 2-D tensor, got shape {tuple(x.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    x = x.detach().to(device="cpu", dtype=torch.float32)
    rows, cols = x.shape
    g = effective_group_size(cols, group_size)
    ng = n_groups(cols, group_size)
    levels = (1 << bits) - 1
    if rows == 0 or cols == 0:
        empty = torch.zeros(rows, ng, dtype=torch.float16)
        no_codes = pack_bits(torch.zeros(0, dtype=torch.uint8), bits)
        return QuantizedMatrix(no_codes, empty, empty.clone(), bits, g, (rows, cols))
    if not torch.isfinite(x).all() or float(x.abs().max()) > _F16_MAX:
        raise ValueError("quantize_rtn: values must be finite and within the float16 range")

    pad = ng * g - cols
    lo = torch.nn.functional.pad(x, (0, pad), value=float("inf")).view(rows, ng, g).amin(dim=2)
    hi = torch.nn.functional.pad(x, (0, pad), value=float("-inf")).view(rows, ng, g).amax(dim=2)

    zero = lo.to(torch.float16)
    zero = _step_f16(zero, zero.float() > lo, float("-inf"))
    span = hi - zero.float()
    scale = (span / levels).to(torch.float16)
    # Round the step up until the float16 grid reaches the group maximum.
    for _ in range(4):
        short = zero.float() + levels * scale.float() < hi
        if not bool(short.any()):
            break
        scale = _step_f16(scale, short, float("inf"))
    if not torch.isfinite(scale).all():
        raise ValueError("quantize_rtn: a group's range does not fit a float16 scale")

    s = _expand(scale, g, cols)
    z = _expand(zero, g, cols)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round((x - z) / safe).clamp_(0, levels)
    q = torch.where(s > 0, q, torch.zeros_like(q))
    codes = pack_bits(q.to(torch.uint8), bits)
    return QuantizedMatrix(codes, scale.contiguous(), zero.contiguous(), bits, g, (rows, cols))


def dequantize(q: QuantizedMatrix) -> torch.Tensor:
    """float32 ``zero + code * scale`` of every entry, in the original shape."""
    import torch

    rows, cols = q.shape
    # codes unpack on the CPU; the arithmetic runs where the scales are (a decode on a GPU)
    codes = unpack_bits(q.codes, q.bits, rows * cols).view(rows, cols)
    codes = codes.to(device=q.scale.device, dtype=torch.float32)
    if rows == 0 or cols == 0:
        return codes
    return _expand(q.zero, q.group_size, cols) + codes * _expand(q.scale, q.group_size, cols)


def quantized_nbytes(rows: int, cols: int, bits: int, group_size: int) -> int:
    """Payload of a :class:`QuantizedMatrix`: packed codes plus float16 scale and zero."""
    return packed_nbytes(rows * cols, bits) + 2 * 2 * rows * n_groups(cols, group_size)


def quantize_to_grid(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int
) -> QuantizedMatrix:
    """Codes of ``x`` on a given grid (``scale`` / ``zero``: float16 [rows, n_groups]).

    For quantisers that choose the grid themselves (GPTQ): ``x`` is usually already on the grid,
    and rounding recovers its codes exactly.
    """
    import torch

    x = x.detach().to(device="cpu", dtype=torch.float32)
    rows, cols = x.shape
    g = effective_group_size(cols, group_size)
    levels = (1 << bits) - 1
    s = _expand(scale, g, cols)
    z = _expand(zero, g, cols)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round((x - z) / safe).clamp_(0, levels)
    q = torch.where(s > 0, q, torch.zeros_like(q))
    codes = pack_bits(q.to(torch.uint8), bits)
    return QuantizedMatrix(codes, scale.contiguous(), zero.contiguous(), bits, g, (rows, cols))
