"""GPTQ (Frantar et al., 2022) for the singular vectors of the ``mixed`` codec.

GPTQ quantises ``W`` (rows × cols, acting on inputs ``x`` of length cols) one input column at a
time to minimise ``‖W X − Ŵ X‖²``; after each column it spreads the column's rounding error over
the columns not yet quantised, using the inverse of ``H = X Xᵀ`` (through its Cholesky factor).
Only ``H`` is needed, never the activations themselves.

GraftLLM applies it to the kept factors ``U diag(σ) Vᵀ`` of the delta's SVD (R components cut
into bands of different bits) in two steps:

1. ``V̂ᵀ = Quant(Vᵀ, x)``: ``Vᵀ`` (R × n) sees the module's input ``x``; the grid is the stored
   one (per singular vector, groups of ``group_size`` consecutive input dims, the band's bits).
   Rows are independent given ``H``, so all bands go in one pass.
2. ``Û = Quant(U, Σ V̂ᵀ x)``: ``U`` (m × R) sees the R-dimensional code, whose second moment is
   ``Σ V̂ᵀ H V̂ Σ``; a column of ``U`` is one singular vector, quantised on its own grid (groups
   along m), so the result is stored exactly like round-to-nearest output. Solving all bands
   together lets later (coarser) components compensate the rounding of earlier ones.

``damp`` adds ``damp · mean(diag H)`` to the diagonal (numerical safety; 0.01 as in the paper).
``act_order`` quantises columns in order of decreasing ``diag(H)``; with groups along the
columns, the groups' grids are then fixed up front from the unquantised weights ("static
groups"), so that the stored layout still has consecutive groups.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from graftbuild.compress.quant import (
    QuantizedMatrix,
    effective_group_size,
    n_groups,
    quantize_rtn,
    quantize_to_grid,
)

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Calibration:
    """What a calibrated quantiser knows about one linear module's inputs."""

    hessian: torch.Tensor
    """``H = X Xᵀ / N``, n × n float32, over the module's N calibration input vectors."""
    damp: float = 0.01
    act_order: bool = False


ColumnQuantizer = Callable[[int, int, "torch.Tensor"], "torch.Tensor"]
"""``(original column index c, position i, working matrix) -> column i on column c's grid``.

The working matrix holds the columns in processing order, already updated by the compensation
of every column before position i, in the current block (read it, do not write it)."""


def _on_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    import torch

    s, z = scale.float(), zero.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round((w - z) / safe).clamp_(0, (1 << bits) - 1)
    return torch.where(s > 0, z + q * s, z)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor | None:
    """Upper Cholesky factor of ``(H + λI)⁻¹``, raising λ until it exists (None if never)."""
    import torch

    mean = float(torch.diagonal(h).mean())
    if not mean > 0:
        return None
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for factor in (1.0, 10.0, 100.0):
        try:
            lower = torch.linalg.cholesky(h + (damp * factor * mean + 1e-12) * eye)
            inv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inv, upper=True)
        except RuntimeError:  # torch.linalg.LinAlgError: not positive definite
            continue
    return None


def gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    quantize_column: ColumnQuantizer,
    damp: float = 0.01,
    act_order: bool = False,
    block: int = 128,
) -> torch.Tensor | None:
    """Ŵ (rows × cols, float32) with every column on its quantiser's grid; None if ``H`` has no
    usable curvature (the caller falls back to round-to-nearest).

    Updates are applied lazily per ``block`` columns, as in the reference implementation: the
    columns after the current block see its compensation only when the block is done.
    """
    import torch

    h = h.detach().to(device="cpu", dtype=torch.float64).clone()
    cols = w.shape[1]
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    order = (
        torch.argsort(torch.diagonal(h), descending=True, stable=True)
        if act_order
        else torch.arange(cols)
    )
    hinv64 = _inverse_cholesky(h[order][:, order], damp)
    if hinv64 is None:
        return None
    hinv = hinv64.to(torch.float32)
    w = w.detach().to(device="cpu", dtype=torch.float32)[:, order].clone()
    q = torch.zeros_like(w)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        errs = torch.zeros(w.shape[0], i2 - i1)
        for i in range(i1, i2):
            qc = quantize_column(int(order[i]), i, w)
            q[:, i] = qc
            err = errs[:, i - i1]
            torch.sub(w[:, i], qc, out=err).div_(hinv[i, i])
            w[:, i + 1 : i2].addr_(err, hinv[i, i + 1 : i2], alpha=-1.0)
        if i2 < cols:
            w[:, i2:].addmm_(errs, hinv[i1:i2, i2:], alpha=-1.0)
    out = torch.empty_like(q)
    out[:, order] = q
    return out


def _on_grid_rows(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: torch.Tensor
) -> torch.Tensor:
    """``w`` (one value per row) rounded to each row's grid. ``scale`` / ``zero`` float32;
    ``levels`` = 2**bits - 1 per row. A zero scale (a constant group) maps to ``zero``."""
    import torch

    # Divide as quantize_rtn does: a multiply by 1/scale rounds differently at exact ties, and
    # then an identity Hessian no longer gives RTN's codes.
    positive = scale > 0
    q = (w - zero).div_(torch.where(positive, scale, 1.0)).round_().clamp_(min=0)
    q = torch.where(positive, torch.minimum(q, levels), 0.0)
    return q.mul_(scale).add_(zero)


def gptq_rows(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: list[int],
    group_size: int,
    damp: float,
    act_order: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """GPTQ of ``w`` (rows × cols) on the stored grid: per row, groups of consecutive columns,
    row i with ``bits[i]`` bits. Returns (Ŵ, scale, zero); rows are independent given ``H``, so
    rows of different precision are done in one pass."""
    import torch

    rows, cols = w.shape
    g = effective_group_size(cols, group_size)
    ng = n_groups(cols, group_size)
    scale = torch.zeros(rows, ng, dtype=torch.float16)
    zero = torch.zeros(rows, ng, dtype=torch.float16)
    runs: list[tuple[int, int, int]] = []  # (start, stop, bits) of rows with equal bits
    for i, b in enumerate(bits):
        if runs and runs[-1][2] == b:
            runs[-1] = (runs[-1][0], i + 1, b)
        else:
            runs.append((i, i + 1, b))
    levels = torch.tensor([(1 << b) - 1 for b in bits], dtype=torch.float32)

    def grid(block: torch.Tensor, k: int) -> None:
        for a, z, b in runs:
            q = quantize_rtn(block[a:z], b, g)
            scale[a:z, k], zero[a:z, k] = q.scale[:, 0], q.zero[:, 0]

    if act_order:  # static groups: grids from the unquantised weights
        for k in range(ng):
            grid(w[:, k * g : (k + 1) * g].float(), k)

    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def quantize_column(c: int, i: int, work: torch.Tensor) -> torch.Tensor:
        k = c // g
        if not act_order and c % g == 0:
            # Without act-order, position i is column c: the group's grid comes from its
            # columns as they are now, after the compensation of all earlier columns.
            grid(work[:, i : min(i + g, cols)], k)
            cache.pop(k, None)
        if k not in cache:
            cache[k] = (scale[:, k].float(), zero[:, k].float())
        s, z = cache[k]
        return _on_grid_rows(work[:, i], s, z, levels)

    # Blocks hold whole groups, so a group's grid sees all compensation of earlier columns.
    q = gptq(w, h, quantize_column, damp, act_order, block=g * max(1, 128 // g))
    if q is None:
        return None
    return q, scale, zero


def gptq_vectors(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: list[int],
    group_size: int,
    damp: float,
    act_order: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """GPTQ of ``w`` (m × r) whose column j is quantised on its own grid (groups along m) with
    ``bits[j]`` bits. Returns (Ŵᵀ, scale, zero), one vector per row."""
    import torch

    m, r = w.shape
    ng = n_groups(m, group_size)
    g = effective_group_size(m, group_size)
    scale = torch.zeros(r, ng, dtype=torch.float16)
    zero = torch.zeros(r, ng, dtype=torch.float16)

    def quantize_column(c: int, i: int, work: torch.Tensor) -> torch.Tensor:
        col = work[:, i]
        q = quantize_rtn(col[None, :], bits[c], group_size)
        scale[c], zero[c] = q.scale[0], q.zero[0]
        s = q.scale[0].float().repeat_interleave(g)[:m]
        z = q.zero[0].float().repeat_interleave(g)[:m]
        return _on_grid(col, s, z, bits[c])

    q = gptq(w, h, quantize_column, damp, act_order)
    if q is None:
        return None
    return q.T, scale, zero


def gptq_factors(
    u: torch.Tensor,
    sigma: torch.Tensor,
    vt: torch.Tensor,
    bands: list[tuple[int, int]],
    group_size: int,
    calibration: Calibration,
) -> list[tuple[QuantizedMatrix, QuantizedMatrix]]:
    """GPTQ of the kept factors ``u`` (m × R), ``sigma`` [R], ``vt`` (R × n) cut into
    ``bands`` [(rank, bits)]: ``V̂ᵀ = Quant(Vᵀ, x)``, then ``Û = Quant(U, Σ V̂ᵀ x)``.

    Returns (Ûᵀ, V̂ᵀ) per band, in the stored layout. ``Û`` is solved for all bands together,
    so a lower-precision band also compensates the rounding of the bands before it. Falls back
    to round-to-nearest where the Hessian has no usable curvature.
    """
    import torch

    from graftbuild.compress.quant import dequantize

    n = vt.shape[1]
    h = calibration.hessian.to(device="cpu", dtype=torch.float32)
    if tuple(h.shape) != (n, n):
        raise ValueError(f"calibration Hessian has shape {tuple(h.shape)}, expected {n} square")
    bits = [b for r, b in bands for _ in range(r)]
    cuts = [0]
    for r, _ in bands:
        cuts.append(cuts[-1] + r)
    spans = [(cuts[i], cuts[i + 1], b) for i, (_, b) in enumerate(bands)]

    v_rows = gptq_rows(vt, h, bits, group_size, calibration.damp, calibration.act_order)
    if v_rows is None:
        vq = [quantize_rtn(vt[a:z], b, group_size) for a, z, b in spans]
    else:
        vhat, vs, vz = v_rows
        vq = [quantize_to_grid(vhat[a:z], vs[a:z], vz[a:z], b, group_size) for a, z, b in spans]
    code = torch.cat([dequantize(q) for q in vq]) * sigma.float()[:, None]  # R × n: Σ V̂ᵀ
    u_rows = gptq_vectors(
        u, code @ h @ code.T, bits, group_size, calibration.damp, calibration.act_order
    )
    if u_rows is None:
        uq = [quantize_rtn(u[:, a:z].T, b, group_size) for a, z, b in spans]
    else:
        uhat, us, uz = u_rows
        uq = [quantize_to_grid(uhat[a:z], us[a:z], uz[a:z], b, group_size) for a, z, b in spans]
    return list(zip(uq, vq, strict=True))
