"""``@triton.jit`` tile helpers: a logit tile, its keep-mask and hardness penalty, and the two segment
walks (the online log-sum-exp of the forward; the gradient tile G and ``G Y`` of the backward).

Every helper works on one block of rows ``rows`` (local indices, ``row_ok`` in range) against the
columns of one candidate segment, in tiles of BLOCK_N columns, with D looped in BLOCK_D chunks.
Global pair indices (``rows_g``, ``cols + col_offset``) are what the masks compare. The ``mask``
constexprs take the bits of ``plan.SELF`` (1) and ``plan.GROUP`` (2).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def inv_norms(R, idx, ok, BLOCK: tl.constexpr, NORMED: tl.constexpr):
    """Inverse norms [BLOCK] of rows ``idx`` (ones without NORMED; R is then never read)."""
    r = tl.full((BLOCK,), 1.0, dtype=tl.float32)
    if NORMED:
        r = tl.load(R + idx, mask=ok, other=1.0)
    return r


@triton.jit
def logits(X, sxn, sxd, rx, rows, row_ok, Y, syn, syd, ry, cols, col_ok, dim, scale, NORMED: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Logit tile [BLOCK_M, BLOCK_N] = scale * X[rows] @ Y[cols]^T, float32 accumulation over D chunks;
    with NORMED, of the unit vectors: the tile is scaled by the rows' inverse norms rx, ry once, after
    the K-loop (the tiles go from memory to the dot untouched)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_D)
    x_rows = X + rows.to(tl.int64)[:, None] * sxn
    y_rows = Y + cols.to(tl.int64)[:, None] * syn
    for k0 in range(0, dim, BLOCK_D):
        ks = k0 + offs_k
        k_ok = ks[None, :] < dim
        x = tl.load(x_rows + ks[None, :] * sxd, mask=row_ok[:, None] & k_ok, other=0.0)
        y = tl.load(y_rows + ks[None, :] * syd, mask=col_ok[:, None] & k_ok, other=0.0)
        acc = tl.dot(x, tl.trans(y), acc, input_precision=PRECISION)
    if NORMED:
        return acc * (scale * rx[:, None] * ry[None, :])
    return acc * scale


@triton.jit
def column_tile(c0, X, sxn, sxd, rx, rows, row_ok, Y, syn, syd, RY, n_cols, dim, scale, NORMED: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """The tile of columns ``c0 ..`` of a segment: (cols, col_ok, their inverse norms, logits)."""
    cols = c0 + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    ry = inv_norms(RY, cols, col_ok, BLOCK_N, NORMED)
    s = logits(X, sxn, sxd, rx, rows, row_ok, Y, syn, syd, ry, cols, col_ok, dim, scale, NORMED,
               BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    return cols, col_ok, ry, s


@triton.jit
def keep_mask(rows_g, row_ok, cols_g, col_ok, G, MASK: tl.constexpr):
    """Keep-mask [BLOCK_M, BLOCK_N]: in range, minus the own pair (bit 1: rows_g == cols_g) and the
    other pairs of the row's group (bit 2: equal group ids G, rows_g != cols_g)."""
    keep = row_ok[:, None] & col_ok[None, :]
    if MASK != 0:
        same = rows_g[:, None] == cols_g[None, :]
        if MASK % 2 == 1:
            keep = keep & ~same
        if MASK // 2 == 1:
            g_rows = tl.load(G + rows_g, mask=row_ok, other=0)
            g_cols = tl.load(G + cols_g, mask=col_ok, other=0)
            keep = keep & ~((g_rows[:, None] == g_cols[None, :]) & ~same)
    return keep


@triton.jit
def penalised(s, rows_g, cols_g, hard, PEN: tl.constexpr):
    """The hardness penalty on a logit tile: s + alpha * (x . y) = s (1 + hard), hard = alpha / scale
    (s = scale * x . y), on the entries of the anchor's own pair (PEN bit 1) and of other pairs
    (bit 2). A constant: the gradient flows through s only."""
    if PEN == 3:
        return s * (1.0 + hard)
    same = rows_g[:, None] == cols_g[None, :]
    if PEN == 1:
        return tl.where(same, s * (1.0 + hard), s)
    return tl.where(same, s, s * (1.0 + hard))


@triton.jit
def lse_walk(m, l, X, sxn, sxd, rx, rows, rows_g, row_ok, Y, syn, syd, RY, G, n_cols, dim, scale, hard,
             MASK: tl.constexpr, PEN: tl.constexpr, NORMED: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Fold one candidate segment (global column index = local index) into the running (max m,
    sum l) of each anchor row; PEN: the hardness penalty's entries (``penalised``)."""
    for c0 in range(0, n_cols, BLOCK_N):
        cols, col_ok, ry, s = column_tile(c0, X, sxn, sxd, rx, rows, row_ok, Y, syn, syd, RY, n_cols, dim, scale,
                                          NORMED, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        if PEN != 0:
            s = penalised(s, rows_g, cols, hard, PEN)
        s = tl.where(keep_mask(rows_g, row_ok, cols, col_ok, G, MASK), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        # A row with nothing kept so far keeps m = -inf; shift by 0 so exp(-inf - 0) = 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m = m_new
    return m, l


@triton.jit
def grad_walk(OUT, son, sod, X, sxn, sxd, rx, rows, rows_g, row_ok, lse_r, w_r, Y, syn, syd, RY, LSE_C, W_C,
              G, n_cols, col_offset, dim, scale, hard, FIRST: tl.constexpr, ROW: tl.constexpr, COL: tl.constexpr,
              MASK: tl.constexpr, PEN: tl.constexpr, PEN_COL: tl.constexpr, NORMED: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """OUT[rows] (+)= G Y over this segment's columns, in float32 (scale applied by the epilogue).

    G [BLOCK_M, BLOCK_N] is the gradient coefficient of the tile's logits, recomputed once for
    every block it serves: ROW, the rows are anchors, ``w_r exp(S - lse_r)`` (row statistics);
    COL, the columns are anchors (``s(y_j, x_i) = S_ij``), ``w_c exp(S - lse_c)`` with the columns'
    statistics LSE_C, W_C (local column index). PEN: the hardness penalty's entries, in the
    softmax of the column role (PEN_COL) or the row role; it weighs P, while G multiplies the
    unpenalised tiles (stop-gradient). With NORMED the columns' inverse norms go into G,
    so that G Y sums unit vectors. FIRST: this is the program's first walk, whose first tile stores
    instead of adding (the buffer needs no zeroing). Between tiles a barrier orders each tile's
    stores before the next tile's loads of the same rows, which other threads of the program may
    make.
    """
    offs_k = tl.arange(0, BLOCK_D)
    out_rows = OUT + rows.to(tl.int64)[:, None] * son
    for c0 in range(0, n_cols, BLOCK_N):
        cols, col_ok, ry, s = column_tile(c0, X, sxn, sxd, rx, rows, row_ok, Y, syn, syd, RY, n_cols, dim, scale,
                                          NORMED, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        keep = keep_mask(rows_g, row_ok, cols + col_offset, col_ok, G, MASK)
        s_row = s
        s_col = s
        if PEN != 0:
            if PEN_COL:
                s_col = penalised(s, rows_g, cols + col_offset, hard, PEN)
            else:
                s_row = penalised(s, rows_g, cols + col_offset, hard, PEN)
        g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if ROW:
            g += tl.exp(tl.where(keep, s_row - lse_r[:, None], float("-inf"))) * w_r[:, None]
        if COL:
            lse_c = tl.load(LSE_C + cols, mask=col_ok, other=0.0)
            w_c = tl.load(W_C + cols, mask=col_ok, other=0.0)
            g += tl.exp(tl.where(keep, s_col - lse_c[None, :], float("-inf"))) * w_c[None, :]
        if NORMED:
            g = g * ry[None, :]  # sum_j G_ij r_j y_j = sum_j G_ij (unit y_j), with raw y below
        g = g.to(Y.dtype.element_ty)  # the dot's operand, cast once: the float32 tile dies here
        if FIRST:
            started = c0 > 0
        else:
            started = c0 >= 0
        y_rows = Y + cols.to(tl.int64)[:, None] * syn
        for k0 in range(0, dim, BLOCK_D):
            ks = k0 + offs_k
            k_ok = ks[None, :] < dim
            y = tl.load(y_rows + ks[None, :] * syd, mask=col_ok[:, None] & k_ok, other=0.0)
            upd = tl.dot(g, y, input_precision=PRECISION)
            ptrs = out_rows + ks[None, :] * sod
            out_ok = row_ok[:, None] & k_ok
            upd += tl.load(ptrs, mask=out_ok & started, other=0.0)
            tl.store(ptrs, upd, mask=out_ok)
        tl.debug_barrier()
