"""The hybrid path's Triton kernels: elementwise passes over one chunk of logits that a GEMM (cuBLAS
through ``torch.mm``) wrote in float32, each reading the chunk once.

- ``lse_partials_kernel`` (forward): for a [BLOCK_M, BLOCK_N] tile of ``S = X_c Y^T``, the masked,
  penalised log-sum-exp of each row over the tile's columns (the row block's partial) and, with the
  COL role, of each column over the tile's rows (the column block's partial: d2q read off the q2d
  logits). The partials ([column tiles, rows] and [row tiles, columns], a 1 / BLOCK_N and 1 / BLOCK_M
  fraction of the chunk) are merged in torch, in a fixed order.
- ``coefficient_kernel`` (backward): the coefficient tile ``G = w_r P_row + w_c P_col`` of every block
  the tile serves (``sweeps.coefficient``, the fused kernels' own), written in the GEMM's input dtype
  for ``dX_c = G Y`` and ``dY += G^T X_c``.

The roles are those of the fused kernels (``_plan.Launch.roles``); masks and penalties come from the
same helpers (``tiles.keep_mask``, ``tiles.penalised``), so the two paths cannot disagree on them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .sweeps import coefficient
from .tiles import COL, PEN_COL, PEN_OTHER, PEN_OWN, ROW, has, keep_mask, penalised, unpresumed


@triton.jit
def _partial_lse(s, keep, AXIS: tl.constexpr):
    """log sum exp of the kept entries of s along AXIS (-inf where none is kept)."""
    s = tl.where(keep, s, float("-inf"))
    m = tl.max(s, AXIS)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    if AXIS == 1:
        total = tl.sum(tl.exp(s - m_safe[:, None]), 1)
    else:
        total = tl.sum(tl.exp(s - m_safe[None, :]), 0)
    return tl.where(total > 0, m_safe + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))


@triton.jit
def lse_partials_kernel(
    S,
    stride_s_row,
    stride_s_col,
    ROW_PART,
    COL_PART,
    GROUP_IDS,
    THRESHOLDS,
    n_rows,
    n_cols,
    row_offset,
    SCALE,
    hardness,
    ROLE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """ROW_PART[tile_n, rows] (ROW) and COL_PART[tile_m, cols] (COL): partial log-partitions of the
    logits ``scale * S`` [n_rows, n_cols] (S the raw float32 dot products, scale at SCALE; the
    hardness penalty's alpha is ``hardness``). Row i is pair
    ``row_offset + i``, column j pair j."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    rows_g = rows + row_offset
    s = tl.load(
        S + rows.to(tl.int64)[:, None] * stride_s_row + cols[None, :] * stride_s_col,
        mask=row_ok[:, None] & col_ok[None, :],
        other=0.0,
    )
    scale = tl.load(SCALE)
    penalty = hardness / scale
    s = s * scale
    pairs = (GROUP_IDS, THRESHOLDS)
    keep = keep_mask(rows_g, row_ok, cols, col_ok, pairs, ROLE=ROLE)
    keep_row = unpresumed(keep, s, rows_g, row_ok, cols, col_ok, pairs, ROLE=ROLE, COLUMNS=False)
    keep_col = unpresumed(keep, s, rows_g, row_ok, cols, col_ok, pairs, ROLE=ROLE, COLUMNS=True)
    penalised_s = s
    if has(ROLE, PEN_OWN | PEN_OTHER):
        penalised_s = penalised(s, rows_g, cols, penalty, ROLE=ROLE)
    if has(ROLE, ROW):
        s_row = s
        if has(ROLE, PEN_OWN | PEN_OTHER) and not has(ROLE, PEN_COL):
            s_row = penalised_s
        tl.store(ROW_PART + pid_n * n_rows + rows, _partial_lse(s_row, keep_row, AXIS=1), mask=row_ok)
    if has(ROLE, COL):
        s_col = s
        if has(ROLE, PEN_COL):
            s_col = penalised_s
        tl.store(COL_PART + pid_m * n_cols + cols, _partial_lse(s_col, keep_col, AXIS=0), mask=col_ok)


@triton.jit
def coefficient_kernel(
    S,
    stride_s_row,
    stride_s_col,
    G,
    stride_g_row,
    stride_g_col,
    GROUP_IDS,
    THRESHOLDS,
    ROW_LSE,
    ROW_W,
    COL_LSE,
    COL_W,
    n_rows,
    n_cols,
    row_offset,
    SCALE,
    hardness,
    ROLE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """G [n_rows, n_cols] (G's dtype) = the coefficient tile of the logits ``scale * S``: with ROW the
    rows' ``w_i exp(s - lse_i)`` (ROW_LSE, ROW_W), with COL the columns' ``w_j exp(s - lse_j)``
    (COL_LSE, COL_W), 0 where masked (``sweeps.coefficient``). Row i is pair ``row_offset + i``,
    column j pair j."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    ok = row_ok[:, None] & col_ok[None, :]
    s = tl.load(S + rows.to(tl.int64)[:, None] * stride_s_row + cols[None, :] * stride_s_col, mask=ok, other=0.0)
    scale = tl.load(SCALE)
    penalty = hardness / scale
    row_lse = tl.load(ROW_LSE + rows, mask=row_ok, other=0.0)
    row_w = tl.load(ROW_W + rows, mask=row_ok, other=0.0)
    row = (rows, rows + row_offset, row_ok, None, row_lse, row_w)
    seg = (None, None, None, None, COL_LSE, COL_W)
    coef = coefficient(
        s * scale,
        None,
        row,
        seg,
        cols,
        col_ok,
        0,
        (GROUP_IDS, THRESHOLDS),
        penalty,
        ROLE=ROLE,
        NORMED=False,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
    )
    tl.store(
        G + rows.to(tl.int64)[:, None] * stride_g_row + cols[None, :] * stride_g_col,
        coef.to(G.dtype.element_ty),
        mask=ok,
    )
