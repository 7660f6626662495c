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

Matryoshka prefixes (``hybrid``): S holds raw dot products, one tile per prefix, and with NORMED each
prefix's logits are ``scale * S_k a_i b_j`` with the rows' and columns' inverse prefix norms a, b.
The backward kernel takes the K prefixes of a tile in one launch, last first, and writes the running
sums ``sum_{k' >= k} G_k' a b`` (the coefficients of the raw dots of slice k of D), so one GEMM per
slice gives every prefix's gradient.

The roles are those of the fused kernels (``_plan.Launch.roles``); masks and penalties come from the
same helpers (``tiles.keep_mask``, ``tiles.penalised``), so the two paths cannot disagree on them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .sweeps import coefficient
from .tiles import COL, PEN_COL, PEN_OTHER, PEN_OWN, ROW, has, keep_mask, penalised, scaled, unpresumed


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
    ROW_NORM,
    stride_row_norm,
    COL_NORM,
    stride_col_norm,
    n_rows,
    n_cols,
    row_offset,
    SCALE,
    hardness,
    ROLE: tl.constexpr,
    NORMED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """ROW_PART[tile_n, rows] (ROW) and COL_PART[tile_m, cols] (COL): partial log-partitions of the
    logits ``scale * S`` [n_rows, n_cols] (S the raw float32 dot products, scale at SCALE; with NORMED
    over the rows' and columns' inverse norms ROW_NORM, COL_NORM; the hardness penalty's alpha is
    ``hardness``). Row i is pair ``row_offset + i``, column j pair j."""
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
    row_norm = None
    col_norm = None
    if NORMED:
        row_norm = tl.load(ROW_NORM + rows.to(tl.int64) * stride_row_norm, mask=row_ok, other=0.0)
        col_norm = tl.load(COL_NORM + cols.to(tl.int64) * stride_col_norm, mask=col_ok, other=0.0)
    s = scaled(s, row_norm, col_norm, scale, NORMED=NORMED)
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
def _prefix_coefficients(
    total,
    k,
    launch,
    ROLE: tl.constexpr,
    NORMED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``total`` plus prefix k's coefficient tile (times the inverse norms with NORMED), stored to
    G[k]; with NORMED, prefix k's partial sums for the norms' gradient (``coefficient_kernel``)."""
    buffers, rows, cols, row_offset, pairs, stats, norms, dots, scale, penalty = launch
    S, stride_s_prefix, G, stride_g_prefix, tile, out = buffers
    GROUP_IDS, THRESHOLDS, stride_thresholds_prefix = pairs
    ROW_LSE, ROW_W, stride_row_stats_prefix, COL_LSE, COL_W, stride_col_stats_prefix = stats
    ROW_NORM, stride_row_norm, COL_NORM, stride_col_norm = norms
    ROW_DOTS, COL_DOTS, n_rows, n_cols = dots
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    ok = row_ok[:, None] & col_ok[None, :]
    raw = tl.load(S + stride_s_prefix.to(tl.int64) * k + tile, mask=ok, other=0.0)
    row_norm = None
    col_norm = None
    if NORMED:
        row_norm = tl.load(ROW_NORM + rows.to(tl.int64) * stride_row_norm + k, mask=row_ok, other=0.0)
        col_norm = tl.load(COL_NORM + cols.to(tl.int64) * stride_col_norm + k, mask=col_ok, other=0.0)
    row_lse = tl.load(ROW_LSE + k * stride_row_stats_prefix + rows, mask=row_ok, other=0.0)
    row_w = tl.load(ROW_W + k * stride_row_stats_prefix + rows, mask=row_ok, other=0.0)
    row = (rows, rows + row_offset, row_ok, None, row_lse, row_w)
    seg = (None, None, None, None, COL_LSE + k * stride_col_stats_prefix, COL_W + k * stride_col_stats_prefix)
    coef = coefficient(
        scaled(raw, row_norm, col_norm, scale, NORMED=NORMED),
        None,
        row,
        seg,
        cols,
        col_ok,
        0,
        (GROUP_IDS, THRESHOLDS + k * stride_thresholds_prefix),
        penalty,
        ROLE=ROLE,
        NORMED=False,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
    )
    if NORMED:
        # L = scale S a_i b_j: dL/da_i = scale S b_j, dL/db_j = scale S a_i (scale in the common factor)
        weighted = coef * raw
        row_dots = tl.sum(weighted * col_norm[None, :], 1)
        col_dots = tl.sum(weighted * row_norm[:, None], 0)
        tl.store(ROW_DOTS + (k * tl.num_programs(1) + tl.program_id(1)) * n_rows + rows, row_dots, mask=row_ok)
        tl.store(COL_DOTS + (k * tl.num_programs(0) + tl.program_id(0)) * n_cols + cols, col_dots, mask=col_ok)
        # dL/dS = scale a_i b_j: the coefficient of the raw dots, which the GEMMs multiply
        coef = coef * row_norm[:, None] * col_norm[None, :]
    total += coef
    tl.store(G + stride_g_prefix.to(tl.int64) * k + out, total.to(G.dtype.element_ty), mask=ok)
    return total


@triton.jit
def coefficient_kernel(
    S,
    stride_s_prefix,
    stride_s_row,
    stride_s_col,
    G,
    stride_g_prefix,
    stride_g_row,
    stride_g_col,
    GROUP_IDS,
    THRESHOLDS,
    stride_thresholds_prefix,
    ROW_LSE,
    ROW_W,
    stride_row_stats_prefix,
    COL_LSE,
    COL_W,
    stride_col_stats_prefix,
    ROW_NORM,
    stride_row_norm,
    COL_NORM,
    stride_col_norm,
    ROW_DOTS,
    COL_DOTS,
    n_rows,
    n_cols,
    n_prefixes,
    row_offset,
    SCALE,
    hardness,
    ROLE: tl.constexpr,
    PREFIXED: tl.constexpr,
    NORMED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """G[k] [n_rows, n_cols] (G's dtype), k < n_prefixes: the running sum, over the prefixes k' >= k,
    of the coefficient tiles of the logits ``scale * S[k']`` (with NORMED over the inverse norms, times
    them: ``G_k' a_i b_j``, the coefficient of the raw dot). A prefix's tile: with ROW the rows'
    ``w_i exp(s - lse_i)`` (ROW_LSE, ROW_W), with COL the columns' ``w_j exp(s - lse_j)`` (COL_LSE,
    COL_W), 0 where masked (``sweeps.coefficient``). Statistics, thresholds and tiles of prefix k are
    at k times their prefix stride; inverse norms are [rows, K] (element (i, k) at
    ``i * stride + k``). Without PREFIXED, one prefix (n_prefixes = 1), straight-line.

    With NORMED, the gradient of F through the inverse norms, up to the common factor: ROW_DOTS[k,
    tile_n, rows] the partial sums ``sum_j G_k,ij S_k,ij b_j`` (dF / da_i) and COL_DOTS[k, tile_m,
    cols] the partial sums ``sum_i G_k,ij S_k,ij a_i`` (dF / db_j).
    Row i is pair ``row_offset + i``, column j pair j."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tile = rows.to(tl.int64)[:, None] * stride_s_row + cols[None, :] * stride_s_col  # S's offsets
    out = rows.to(tl.int64)[:, None] * stride_g_row + cols[None, :] * stride_g_col  # G's offsets
    pairs = (GROUP_IDS, THRESHOLDS, stride_thresholds_prefix)
    stats = (ROW_LSE, ROW_W, stride_row_stats_prefix, COL_LSE, COL_W, stride_col_stats_prefix)
    norms = (ROW_NORM, stride_row_norm, COL_NORM, stride_col_norm)
    dots = (ROW_DOTS, COL_DOTS, n_rows, n_cols)
    scale = tl.load(SCALE)
    penalty = hardness / scale
    # The launch's pointers, offsets and scalars, which every prefix's step reads.
    buffers = (S, stride_s_prefix, G, stride_g_prefix, tile, out)
    launch = (buffers, rows, cols, row_offset, pairs, stats, norms, dots, scale, penalty)
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PREFIXED:
        # A loop over a run-time count (one compile for any number of prefixes), not unrolled: unrolled,
        # every prefix's loads are in flight at once and the heaviest role spills (44-124 B on sm_80 /
        # sm_89 / sm_90 at 4 prefixes).
        for j in range(n_prefixes):
            k = n_prefixes - 1 - j  # last first: the running sum over k' >= k
            total = _prefix_coefficients(total, k, launch, ROLE=ROLE, NORMED=NORMED, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    else:
        _prefix_coefficients(total, 0, launch, ROLE=ROLE, NORMED=NORMED, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
