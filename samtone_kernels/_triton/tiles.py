"""``@triton.jit`` tile helpers: the logit tiles of up to two candidate segments at the same columns,
their keep-mask and hardness penalty, and the forward's online log-sum-exp walk (the backward's
helpers, in ``sweeps``, build on these).

Every helper works on one block of rows against the columns of one or two candidate segments (A and
B: the queries and the documents of a paired walk), in tiles of BLOCK_N columns, with D looped in
BLOCK_D chunks. What they pass around, as tuples (Triton flattens them; nothing is copied):

- ``x = (X, stride_row, stride_dim)``: the program's row tensor;
- ``row = (rows, rows_g, row_ok, inv_norm, lse, w)``: its block of rows (local and global pair
  indices, in range, inverse norms, and the statistics of the rows as anchors);
- ``seg = (Y, stride_row, stride_dim, INV_NORMS, LSE, W)``: a candidate segment, with the statistics
  of its rows as anchors (read by the COL role only).

Global pair indices (``rows_g``, ``cols + col_offset``) are what the masks compare. A segment's part
is one integer constexpr, its *role* (``_plan.Launch.roles``: ROW, COL, DROP_*, PEN_* bits; 0 when
the segment is not walked), read with ``has``; the grad kernel's last step is the FINISH bits
(``_plan.Launch.finish``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .. import _plan

# The role and finish bits of ``_plan``, as compile-time constants of the kernels.
ROW = tl.constexpr(_plan.ROW)
COL = tl.constexpr(_plan.COL)
DROP_SELF = tl.constexpr(_plan.DROP_SELF)
DROP_GROUP = tl.constexpr(_plan.DROP_GROUP)
PEN_OWN = tl.constexpr(_plan.PEN_OWN)
PEN_OTHER = tl.constexpr(_plan.PEN_OTHER)
PEN_COL = tl.constexpr(_plan.PEN_COL)
DROP_MARGIN = tl.constexpr(_plan.DROP_MARGIN)
POSITIVE = tl.constexpr(_plan.POSITIVE)
FUSED = tl.constexpr(_plan.FUSED)
PARTNER = tl.constexpr(_plan.PARTNER)
DOTS = tl.constexpr(_plan.DOTS)


@triton.constexpr_function
def has(flags, bits):
    """Whether the constexpr ``flags`` holds any of ``bits``: the one decoder of roles and FINISH."""
    return (flags & bits) != 0


@triton.jit
def inv_norms(INV_NORMS, idx, ok, BLOCK: tl.constexpr, NORMED: tl.constexpr):
    """Inverse norms [BLOCK] of rows ``idx`` (ones without NORMED; INV_NORMS is then never read)."""
    r = tl.full((BLOCK,), 1.0, dtype=tl.float32)
    if NORMED:
        r = tl.load(INV_NORMS + idx, mask=ok, other=1.0)
    return r


@triton.jit
def keep_mask(rows_g, row_ok, cols_g, col_ok, pairs, ROLE: tl.constexpr):
    """Keep-mask [BLOCK_M, BLOCK_N]: in range, minus the own pair (DROP_SELF: rows_g == cols_g) and
    the other pairs of the row's group (DROP_GROUP: equal group ids, rows_g != cols_g). ``pairs =
    (GROUP_IDS, THRESHOLDS)``: what the masks read per global pair index."""
    GROUP_IDS, _ = pairs
    keep = row_ok[:, None] & col_ok[None, :]
    if has(ROLE, DROP_SELF | DROP_GROUP):
        same = rows_g[:, None] == cols_g[None, :]
        if has(ROLE, DROP_SELF):
            keep = keep & ~same
        if has(ROLE, DROP_GROUP):
            g_rows = tl.load(GROUP_IDS + rows_g, mask=row_ok, other=0)
            g_cols = tl.load(GROUP_IDS + cols_g, mask=col_ok, other=0)
            keep = keep & ~((g_rows[:, None] == g_cols[None, :]) & ~same)
    return keep


@triton.jit
def unpresumed(keep, s, rows_g, row_ok, cols_g, col_ok, pairs, ROLE: tl.constexpr, COLUMNS: tl.constexpr):
    """``keep`` minus the presumed false negatives (DROP_MARGIN) of the anchors on the rows, or with
    COLUMNS on the columns: the entries whose logit s (unpenalised) exceeds the anchor pair's
    threshold ``scale * (q . d + margin)`` (THRESHOLDS, per global pair), except the anchor's own
    positive (POSITIVE: the block holds it at the own pair)."""
    if has(ROLE, DROP_MARGIN):
        _, THRESHOLDS = pairs
        if COLUMNS:
            presumed = s > tl.load(THRESHOLDS + cols_g, mask=col_ok, other=float("inf"))[None, :]
        else:
            presumed = s > tl.load(THRESHOLDS + rows_g, mask=row_ok, other=float("inf"))[:, None]
        if has(ROLE, POSITIVE):
            presumed = presumed & (rows_g[:, None] != cols_g[None, :])
        keep = keep & ~presumed
    return keep


@triton.jit
def penalised(s, rows_g, cols_g, penalty, ROLE: tl.constexpr):
    """The hardness penalty on a logit tile: s + alpha * (x . y) = s (1 + penalty), penalty = alpha /
    scale (s = scale * x . y), on the entries of the anchor's own pair (PEN_OWN) and of other pairs
    (PEN_OTHER). A constant: the gradient flows through s only."""
    if has(ROLE, PEN_OWN) and has(ROLE, PEN_OTHER):
        return s * (1.0 + penalty)
    same = rows_g[:, None] == cols_g[None, :]
    if has(ROLE, PEN_OWN):
        return tl.where(same, s * (1.0 + penalty), s)
    return tl.where(same, s, s * (1.0 + penalty))


@triton.jit
def scaled(dots, x_inv_norm, y_inv_norm, scale, NORMED: tl.constexpr):
    """Logits from a tile of raw dot products: ``scale * x . y``, over both sides' norms with NORMED."""
    if NORMED:
        return dots * (scale * x_inv_norm[:, None] * y_inv_norm[None, :])
    return dots * scale


@triton.jit
def logit_pair(
    x,
    row,
    seg_a,
    seg_b,
    cols,
    col_ok,
    dim,
    scale,
    A_ROLE: tl.constexpr,
    B_ROLE: tl.constexpr,
    NORMED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The logit tiles of columns ``cols`` of segments A and B (each if its role is not 0), from one
    load of each X chunk: (a_inv_norm, s_a, b_inv_norm, s_b), the columns' inverse norms and the
    [BLOCK_M, BLOCK_N] logits (a segment not walked gives a zero tile that nothing reads). Two tiles
    cost one read of the row tile where a walk of each segment apart would read it twice."""
    X, stride_x_row, stride_x_dim = x
    rows, _, row_ok, x_inv_norm, _, _ = row
    A, stride_a_row, stride_a_dim, A_INV_NORMS, _, _ = seg_a
    B, stride_b_row, stride_b_dim, B_INV_NORMS, _, _ = seg_b
    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_D)
    x_rows = X + rows.to(tl.int64)[:, None] * stride_x_row
    c64 = cols.to(tl.int64)[:, None]
    for k0 in range(0, dim, BLOCK_D):
        ks = k0 + offs_k
        k_ok = ks[None, :] < dim
        x_chunk = tl.load(x_rows + ks[None, :] * stride_x_dim, mask=row_ok[:, None] & k_ok, other=0.0)
        if A_ROLE != 0:
            a = tl.load(A + c64 * stride_a_row + ks[None, :] * stride_a_dim, mask=col_ok[:, None] & k_ok, other=0.0)
            acc_a = tl.dot(x_chunk, tl.trans(a), acc_a, input_precision=PRECISION)
        if B_ROLE != 0:
            b = tl.load(B + c64 * stride_b_row + ks[None, :] * stride_b_dim, mask=col_ok[:, None] & k_ok, other=0.0)
            acc_b = tl.dot(x_chunk, tl.trans(b), acc_b, input_precision=PRECISION)
    a_inv_norm = inv_norms(A_INV_NORMS, cols, col_ok, BLOCK=BLOCK_N, NORMED=NORMED)
    b_inv_norm = inv_norms(B_INV_NORMS, cols, col_ok, BLOCK=BLOCK_N, NORMED=NORMED)
    s_a = scaled(acc_a, x_inv_norm, a_inv_norm, scale, NORMED=NORMED)
    return a_inv_norm, s_a, b_inv_norm, scaled(acc_b, x_inv_norm, b_inv_norm, scale, NORMED=NORMED)


@triton.jit
def lse_fold(m, l, s, row, cols, col_ok, pairs, penalty, ROLE: tl.constexpr):
    """Fold a logit tile (global column index = local index) into the running (max m, sum l) of each
    anchor row; the role's PEN bits: the hardness penalty's entries (``penalised``)."""
    _, rows_g, row_ok, _, _, _ = row
    keep = keep_mask(rows_g, row_ok, cols, col_ok, pairs, ROLE=ROLE)
    keep = unpresumed(keep, s, rows_g, row_ok, cols, col_ok, pairs, ROLE=ROLE, COLUMNS=False)
    if has(ROLE, PEN_OWN | PEN_OTHER):
        s = penalised(s, rows_g, cols, penalty, ROLE=ROLE)
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    # A row with nothing kept so far keeps m = -inf; shift by 0 so exp(-inf - 0) = 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
    return m_new, l


@triton.jit
def lse_walk(
    m,
    l,
    x,
    row,
    seg_a,
    seg_b,
    pairs,
    n_cols,
    dim,
    scale,
    penalty,
    A_ROLE: tl.constexpr,
    B_ROLE: tl.constexpr,
    NORMED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Fold segments A and B (each if its role is not 0) into the rows' running (m, l), the tiles of
    both at the same columns from one load of the row tile."""
    for c0 in range(0, n_cols, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        _, s_a, _, s_b = logit_pair(
            x,
            row,
            seg_a,
            seg_b,
            cols,
            col_ok,
            dim,
            scale,
            A_ROLE=A_ROLE,
            B_ROLE=B_ROLE,
            NORMED=NORMED,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_D=BLOCK_D,
            PRECISION=PRECISION,
        )
        if A_ROLE != 0:
            m, l = lse_fold(m, l, s_a, row, cols, col_ok, pairs, penalty, ROLE=A_ROLE)
        if B_ROLE != 0:
            m, l = lse_fold(m, l, s_b, row, cols, col_ok, pairs, penalty, ROLE=B_ROLE)
    return m, l
