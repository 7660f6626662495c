"""``@triton.jit`` tile helpers: the logit tiles of up to two candidate segments at the same columns,
their keep-mask and hardness penalty, the forward's online log-sum-exp walk, and the backward's walk:
coefficient tiles G, and sweeps over D that add their ``G Y`` to the rows' gradient.

Every helper works on one block of rows ``rows`` (local indices, ``row_ok`` in range) against the
columns of one or two candidate segments (A and B: the queries and the documents of a paired walk),
in tiles of BLOCK_N columns, with D looped in BLOCK_D chunks. Global pair indices (``rows_g``,
``cols + col_offset``) are what the masks compare. The ``mask`` constexprs take the bits of
``plan.SELF`` (1) and ``plan.GROUP`` (2).
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
def logit_pair(X, sxn, sxd, rx, rows, row_ok, A, san, sad, RA, B, sbn, sbd, RB, cols, col_ok, dim, scale,
               HAS_A: tl.constexpr, HAS_B: tl.constexpr, NORMED: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """The logit tiles of columns ``cols`` of segments A and B (each if HAS_), from one load of each
    X chunk: (ra, sa, rb, sb), the columns' inverse norms and the [BLOCK_M, BLOCK_N] logits (a
    segment not walked gives a zero tile that nothing reads). Two tiles cost one read of the row tile
    where a walk of each segment apart would read it twice."""
    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_D)
    x_rows = X + rows.to(tl.int64)[:, None] * sxn
    c64 = cols.to(tl.int64)[:, None]
    for k0 in range(0, dim, BLOCK_D):
        ks = k0 + offs_k
        k_ok = ks[None, :] < dim
        x = tl.load(x_rows + ks[None, :] * sxd, mask=row_ok[:, None] & k_ok, other=0.0)
        if HAS_A:
            a = tl.load(A + c64 * san + ks[None, :] * sad, mask=col_ok[:, None] & k_ok, other=0.0)
            acc_a = tl.dot(x, tl.trans(a), acc_a, input_precision=PRECISION)
        if HAS_B:
            b = tl.load(B + c64 * sbn + ks[None, :] * sbd, mask=col_ok[:, None] & k_ok, other=0.0)
            acc_b = tl.dot(x, tl.trans(b), acc_b, input_precision=PRECISION)
    ra = inv_norms(RA, cols, col_ok, BLOCK_N, NORMED)
    rb = inv_norms(RB, cols, col_ok, BLOCK_N, NORMED)
    if NORMED:
        return ra, acc_a * (scale * rx[:, None] * ra[None, :]), rb, acc_b * (scale * rx[:, None] * rb[None, :])
    return ra, acc_a * scale, rb, acc_b * scale


@triton.jit
def lse_fold(m, l, s, rows_g, row_ok, cols, col_ok, G, hard, MASK: tl.constexpr, PEN: tl.constexpr):
    """Fold a logit tile (global column index = local index) into the running (max m, sum l) of each
    anchor row; PEN: the hardness penalty's entries (``penalised``)."""
    if PEN != 0:
        s = penalised(s, rows_g, cols, hard, PEN)
    s = tl.where(keep_mask(rows_g, row_ok, cols, col_ok, G, MASK), s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    # A row with nothing kept so far keeps m = -inf; shift by 0 so exp(-inf - 0) = 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
    return m_new, l


@triton.jit
def lse_walk(m, l, X, sxn, sxd, rx, rows, rows_g, row_ok, A, san, sad, RA, B, sbn, sbd, RB, G, n_cols, dim, scale,
             hard, HAS_A: tl.constexpr, A_MASK: tl.constexpr, A_PEN: tl.constexpr, HAS_B: tl.constexpr,
             B_MASK: tl.constexpr, B_PEN: tl.constexpr, NORMED: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Fold segments A and B (each if HAS_) into the rows' running (m, l), the tiles of both at the
    same columns from one load of the row tile."""
    for c0 in range(0, n_cols, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        _, sa, _, sb = logit_pair(X, sxn, sxd, rx, rows, row_ok, A, san, sad, RA, B, sbn, sbd, RB, cols, col_ok,
                                  dim, scale, HAS_A, HAS_B, NORMED, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        if HAS_A:
            m, l = lse_fold(m, l, sa, rows_g, row_ok, cols, col_ok, G, hard, A_MASK, A_PEN)
        if HAS_B:
            m, l = lse_fold(m, l, sb, rows_g, row_ok, cols, col_ok, G, hard, B_MASK, B_PEN)
    return m, l


@triton.jit
def coefficient(s, ry, rows_g, row_ok, lse_r, w_r, cols, col_ok, col_offset, LSE_C, W_C, G, hard,
                ROW: tl.constexpr, COL: tl.constexpr, MASK: tl.constexpr, PEN: tl.constexpr,
                PEN_COL: tl.constexpr, NORMED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The gradient coefficient G [BLOCK_M, BLOCK_N] (float32) of a logit tile s, for every block the
    tile serves: ROW, the rows are anchors, ``w_r exp(S - lse_r)`` (row statistics); COL, the columns
    are anchors (``s(y_j, x_i) = S_ij``), ``w_c exp(S - lse_c)`` with the columns' statistics LSE_C,
    W_C (local column index). PEN: the hardness penalty's entries, in the softmax of the column role
    (PEN_COL) or the row role; it weighs P, while G multiplies the unpenalised tiles (stop-gradient).
    With NORMED the columns' inverse norms ry go into G, so that G Y sums unit vectors."""
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
        g = g * ry[None, :]  # sum_j G_ij r_j y_j = sum_j G_ij (unit y_j), with raw y in the sweep
    return g


@triton.jit
def coefficients(c0, X, sxn, sxd, rx, rows, rows_g, row_ok, lse_r, w_r, A, san, sad, RA, LSE_A, W_A,
                 B, sbn, sbd, RB, LSE_B, W_B, G, n_cols, col_offset, dim, scale, hard,
                 HAS_A: tl.constexpr, A_ROW: tl.constexpr, A_COL: tl.constexpr, A_MASK: tl.constexpr,
                 A_PEN: tl.constexpr, A_PEN_COL: tl.constexpr,
                 HAS_B: tl.constexpr, B_ROW: tl.constexpr, B_COL: tl.constexpr, B_MASK: tl.constexpr,
                 B_PEN: tl.constexpr, B_PEN_COL: tl.constexpr, NORMED: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """The coefficient tiles (ga, gb) of columns ``c0 ..`` of segments A and B, cast to the dot's
    operand type (the float32 tiles die here), and those columns (cols, col_ok)."""
    cols = c0 + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    ra, sa, rb, sb = logit_pair(X, sxn, sxd, rx, rows, row_ok, A, san, sad, RA, B, sbn, sbd, RB, cols, col_ok,
                                dim, scale, HAS_A, HAS_B, NORMED, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    ga = tl.zeros((BLOCK_M, BLOCK_N), dtype=A.dtype.element_ty)
    gb = tl.zeros((BLOCK_M, BLOCK_N), dtype=B.dtype.element_ty)
    if HAS_A:
        ga = coefficient(sa, ra, rows_g, row_ok, lse_r, w_r, cols, col_ok, col_offset, LSE_A, W_A, G, hard,
                         A_ROW, A_COL, A_MASK, A_PEN, A_PEN_COL, NORMED, BLOCK_M, BLOCK_N).to(A.dtype.element_ty)
    if HAS_B:
        gb = coefficient(sb, rb, rows_g, row_ok, lse_r, w_r, cols, col_ok, col_offset, LSE_B, W_B, G, hard,
                         B_ROW, B_COL, B_MASK, B_PEN, B_PEN_COL, NORMED, BLOCK_M, BLOCK_N).to(B.dtype.element_ty)
    return ga, gb, cols, col_ok


@triton.jit
def _times_chunk(acc, g, Y, syn, syd, cols, col_ok, ks, k_ok, PRECISION: tl.constexpr):
    """acc + g @ Y[cols, ks]."""
    y = tl.load(Y + cols.to(tl.int64)[:, None] * syn + ks[None, :] * syd, mask=col_ok[:, None] & k_ok, other=0.0)
    return tl.dot(g, y, acc, input_precision=PRECISION)


@triton.jit
def sweep(BUF, sbn, sbd, OUT, son, sod, X, sxn, sxd, P, spn, spd, pos, factor, rows, row_ok, dots,
          ga0, gb0, cols0, ok0, ga1, gb1, cols1, ok1, A, san, sad, B, sbn_, sbd_, dim, started, last,
          HAS_A: tl.constexpr, HAS_B: tl.constexpr, SPAN: tl.constexpr, FUSED: tl.constexpr,
          PARTNER: tl.constexpr, DOTS_WANTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
          PRECISION: tl.constexpr):
    """One sweep over D: the rows' float32 buffer (+)= the staged coefficient tiles times their
    candidates, ``ga0 A[cols0] + gb0 B[cols0] (+ ga1 A[cols1] + gb1 B[cols1] with SPAN = 2)``, one
    read-modify-write of BUF for all of them. ``started``: an earlier sweep stored the buffer (else
    this one stores without reading). ``last`` (FUSED): the program's last sweep, which writes the
    gradient itself in OUT's dtype instead, ``factor * BUF (+ pos_i P_i`` with PARTNER, the positive
    logit's term), and with DOTS_WANTED returns dots + <x_i, grad_i> per row; those writes are
    masked by ``last``, not branched (triton 3.6 cannot pipeline a branch here), so ``grad_walk``
    compiles FUSED into its last step only. A barrier after the sweep orders its stores before the
    next sweep's loads of the same rows, which other threads of the program may make."""
    offs_k = tl.arange(0, BLOCK_D)
    r64 = rows.to(tl.int64)[:, None]
    # The flags as row vectors for the masks: under the interpreter they can be Python bools (the sizes
    # they come from are Python ints there), which a mask cannot take.
    started_rows = tl.full((BLOCK_M,), 1, tl.int1) & started
    last_rows = tl.full((BLOCK_M,), 1, tl.int1) & last
    for k0 in range(0, dim, BLOCK_D):
        ks = k0 + offs_k
        k_ok = ks[None, :] < dim
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        if HAS_A:
            acc = _times_chunk(acc, ga0, A, san, sad, cols0, ok0, ks, k_ok, PRECISION)
        if HAS_B:
            acc = _times_chunk(acc, gb0, B, sbn_, sbd_, cols0, ok0, ks, k_ok, PRECISION)
        if SPAN == 2:
            if HAS_A:
                acc = _times_chunk(acc, ga1, A, san, sad, cols1, ok1, ks, k_ok, PRECISION)
            if HAS_B:
                acc = _times_chunk(acc, gb1, B, sbn_, sbd_, cols1, ok1, ks, k_ok, PRECISION)
        ok = row_ok[:, None] & k_ok
        buf = BUF + r64 * sbn + ks[None, :] * sbd
        acc += tl.load(buf, mask=ok & started_rows[:, None], other=0.0)
        if FUSED:  # masks, not a branch: the loop stays one block for the software pipeliner
            out_ok = ok & last_rows[:, None]
            g = acc * factor
            if PARTNER:
                g += pos[:, None] * tl.load(P + r64 * spn + ks[None, :] * spd, mask=out_ok, other=0.0).to(tl.float32)
            tl.store(OUT + r64 * son + ks[None, :] * sod, g.to(OUT.dtype.element_ty), mask=out_ok)
            if DOTS_WANTED:
                x = tl.load(X + r64 * sxn + ks[None, :] * sxd, mask=out_ok, other=0.0).to(tl.float32)
                dots += tl.sum(g * x, 1)  # x is 0 unless last
            tl.store(buf, acc, mask=ok & (last_rows == 0)[:, None])
        else:
            tl.store(buf, acc, mask=ok)
    tl.debug_barrier()
    return dots


@triton.jit
def _walk_step(c0, dots, BUF, sbn, sbd, OUT, son, sod, X, sxn, sxd, P, spn, spd, pos, factor, rx, rows, rows_g,
               row_ok, lse_r, w_r, A, san, sad, RA, LSE_A, W_A, B, sbn_, sbd_, RB, LSE_B, W_B, G, n_cols, col_offset,
               dim, scale, hard, started, last,
               HAS_A: tl.constexpr, A_ROW: tl.constexpr, A_COL: tl.constexpr, A_MASK: tl.constexpr,
               A_PEN: tl.constexpr, A_PEN_COL: tl.constexpr,
               HAS_B: tl.constexpr, B_ROW: tl.constexpr, B_COL: tl.constexpr, B_MASK: tl.constexpr,
               B_PEN: tl.constexpr, B_PEN_COL: tl.constexpr, SPAN: tl.constexpr, FUSED: tl.constexpr,
               PARTNER: tl.constexpr, DOTS_WANTED: tl.constexpr, NORMED: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """The SPAN column tiles from ``c0``: their coefficient tiles, then one ``sweep``."""
    ga0, gb0, cols0, ok0 = coefficients(
        c0, X, sxn, sxd, rx, rows, rows_g, row_ok, lse_r, w_r, A, san, sad, RA, LSE_A, W_A, B, sbn_, sbd_, RB,
        LSE_B, W_B, G, n_cols, col_offset, dim, scale, hard, HAS_A, A_ROW, A_COL, A_MASK, A_PEN, A_PEN_COL,
        HAS_B, B_ROW, B_COL, B_MASK, B_PEN, B_PEN_COL, NORMED, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    ga1, gb1, cols1, ok1 = ga0, gb0, cols0, ok0  # read only with SPAN = 2
    if SPAN == 2:
        ga1, gb1, cols1, ok1 = coefficients(
            c0 + BLOCK_N, X, sxn, sxd, rx, rows, rows_g, row_ok, lse_r, w_r, A, san, sad, RA, LSE_A, W_A,
            B, sbn_, sbd_, RB, LSE_B, W_B, G, n_cols, col_offset, dim, scale, hard,
            HAS_A, A_ROW, A_COL, A_MASK, A_PEN, A_PEN_COL, HAS_B, B_ROW, B_COL, B_MASK, B_PEN, B_PEN_COL,
            NORMED, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    return sweep(BUF, sbn, sbd, OUT, son, sod, X, sxn, sxd, P, spn, spd, pos, factor, rows, row_ok, dots,
                 ga0, gb0, cols0, ok0, ga1, gb1, cols1, ok1, A, san, sad, B, sbn_, sbd_, dim, started, last,
                 HAS_A, HAS_B, SPAN, FUSED, PARTNER, DOTS_WANTED, BLOCK_M, BLOCK_D, PRECISION)


@triton.jit
def grad_walk(dots, BUF, sbn, sbd, OUT, son, sod, X, sxn, sxd, P, spn, spd, pos, factor, rx, rows, rows_g, row_ok,
              lse_r, w_r, A, san, sad, RA, LSE_A, W_A, B, sbn_, sbd_, RB, LSE_B, W_B, G, n_cols, col_offset, dim,
              scale, hard, final,
              HAS_A: tl.constexpr, A_ROW: tl.constexpr, A_COL: tl.constexpr, A_MASK: tl.constexpr,
              A_PEN: tl.constexpr, A_PEN_COL: tl.constexpr,
              HAS_B: tl.constexpr, B_ROW: tl.constexpr, B_COL: tl.constexpr, B_MASK: tl.constexpr,
              B_PEN: tl.constexpr, B_PEN_COL: tl.constexpr,
              FIRST: tl.constexpr, SPAN: tl.constexpr, FUSED: tl.constexpr, PARTNER: tl.constexpr,
              DOTS_WANTED: tl.constexpr, NORMED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Walk segments A and B (each if HAS_) together, SPAN column tiles a step (``_walk_step``). FIRST:
    this is the program's first walk, whose first sweep stores instead of adding (the buffer needs
    no zeroing); ``final``: no walk follows, so its last sweep is the program's last. With FUSED the
    last step is peeled off the loop: only its sweep carries the masked writes of the gradient, the
    others are plain read-modify-writes of BUF. Returns dots (``sweep``)."""
    step: tl.constexpr = SPAN * BLOCK_N
    last_c0 = (tl.cdiv(n_cols, step) - 1) * step
    if FUSED:
        end = last_c0
    else:
        end = n_cols
    for c0 in range(0, end, step):
        if FIRST:
            started = c0 > 0
        else:
            started = c0 >= 0
        dots = _walk_step(c0, dots, BUF, sbn, sbd, OUT, son, sod, X, sxn, sxd, P, spn, spd, pos, factor, rx, rows,
                          rows_g, row_ok, lse_r, w_r, A, san, sad, RA, LSE_A, W_A, B, sbn_, sbd_, RB, LSE_B, W_B, G,
                          n_cols, col_offset, dim, scale, hard, started, final,
                          HAS_A, A_ROW, A_COL, A_MASK, A_PEN, A_PEN_COL, HAS_B, B_ROW, B_COL, B_MASK, B_PEN,
                          B_PEN_COL, SPAN, False, False, False, NORMED, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    if FUSED:
        if FIRST:
            started = last_c0 > 0
        else:
            started = last_c0 >= 0
        dots = _walk_step(last_c0, dots, BUF, sbn, sbd, OUT, son, sod, X, sxn, sxd, P, spn, spd, pos, factor, rx,
                          rows, rows_g, row_ok, lse_r, w_r, A, san, sad, RA, LSE_A, W_A, B, sbn_, sbd_, RB, LSE_B,
                          W_B, G, n_cols, col_offset, dim, scale, hard, started, final,
                          HAS_A, A_ROW, A_COL, A_MASK, A_PEN, A_PEN_COL, HAS_B, B_ROW, B_COL, B_MASK, B_PEN,
                          B_PEN_COL, SPAN, FUSED, PARTNER, DOTS_WANTED, NORMED, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    return dots
