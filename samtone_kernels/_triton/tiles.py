"""``@triton.jit`` tile helpers: the logit tiles of up to two candidate segments at the same columns,
their keep-mask and hardness penalty, the forward's online log-sum-exp walk, and the backward's walk:
coefficient tiles, and sweeps over D that add their ``coef @ Y`` to the rows' gradient.

Every helper works on one block of rows against the columns of one or two candidate segments (A and
B: the queries and the documents of a paired walk), in tiles of BLOCK_N columns, with D looped in
BLOCK_D chunks. What they pass around, as tuples (Triton flattens them; nothing is copied):

- ``x = (X, stride_row, stride_dim)``: the program's row tensor;
- ``row = (rows, rows_g, row_ok, inv_norm, lse, w)``: its block of rows (local and global pair
  indices, in range, inverse norms, and the statistics of the rows as anchors);
- ``seg = (Y, stride_row, stride_dim, INV_NORMS, LSE, W)``: a candidate segment, with the statistics
  of its rows as anchors (read by the COL role only);
- ``dst = (BUF, stride_buf_row, stride_buf_dim, OUT, stride_out_row, stride_out_dim, factor)``: the
  float32 buffer of the rows' gradient and the gradient itself;
- ``partner = (POS_ROWS, stride_row, stride_dim, pos_coef)``: the positive logit's partner rows.

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
def keep_mask(rows_g, row_ok, cols_g, col_ok, GROUP_IDS, ROLE: tl.constexpr):
    """Keep-mask [BLOCK_M, BLOCK_N]: in range, minus the own pair (DROP_SELF: rows_g == cols_g) and
    the other pairs of the row's group (DROP_GROUP: equal group ids, rows_g != cols_g)."""
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
def logit_pair(x, row, seg_a, seg_b, cols, col_ok, dim, scale, A_ROLE: tl.constexpr, B_ROLE: tl.constexpr,
               NORMED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               PRECISION: tl.constexpr):
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
    if NORMED:
        row_scale = scale * x_inv_norm[:, None]
        return a_inv_norm, acc_a * (row_scale * a_inv_norm[None, :]), b_inv_norm, acc_b * (row_scale * b_inv_norm[None, :])
    return a_inv_norm, acc_a * scale, b_inv_norm, acc_b * scale


@triton.jit
def lse_fold(m, l, s, row, cols, col_ok, GROUP_IDS, penalty, ROLE: tl.constexpr):
    """Fold a logit tile (global column index = local index) into the running (max m, sum l) of each
    anchor row; the role's PEN bits: the hardness penalty's entries (``penalised``)."""
    _, rows_g, row_ok, _, _, _ = row
    if has(ROLE, PEN_OWN | PEN_OTHER):
        s = penalised(s, rows_g, cols, penalty, ROLE=ROLE)
    s = tl.where(keep_mask(rows_g, row_ok, cols, col_ok, GROUP_IDS, ROLE=ROLE), s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    # A row with nothing kept so far keeps m = -inf; shift by 0 so exp(-inf - 0) = 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
    return m_new, l


@triton.jit
def lse_walk(m, l, x, row, seg_a, seg_b, GROUP_IDS, n_cols, dim, scale, penalty, A_ROLE: tl.constexpr,
             B_ROLE: tl.constexpr, NORMED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Fold segments A and B (each if its role is not 0) into the rows' running (m, l), the tiles of
    both at the same columns from one load of the row tile."""
    for c0 in range(0, n_cols, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        _, s_a, _, s_b = logit_pair(x, row, seg_a, seg_b, cols, col_ok, dim, scale, A_ROLE=A_ROLE, B_ROLE=B_ROLE,
                                    NORMED=NORMED, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
                                    PRECISION=PRECISION)
        if A_ROLE != 0:
            m, l = lse_fold(m, l, s_a, row, cols, col_ok, GROUP_IDS, penalty, ROLE=A_ROLE)
        if B_ROLE != 0:
            m, l = lse_fold(m, l, s_b, row, cols, col_ok, GROUP_IDS, penalty, ROLE=B_ROLE)
    return m, l


@triton.jit
def coefficient(s, y_inv_norm, row, seg, cols, col_ok, col_offset, GROUP_IDS, penalty, ROLE: tl.constexpr,
                NORMED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The gradient coefficient [BLOCK_M, BLOCK_N] (float32) of a logit tile s, for every block the
    tile serves: ROW, the rows are anchors, ``w_i exp(S - lse_i)`` (the row statistics); COL, the
    columns are anchors (``s(y_j, x_i) = S_ij``), ``w_j exp(S - lse_j)`` with the segment's statistics
    (local column index). PEN bits: the hardness penalty's entries, in the softmax of the column role
    (PEN_COL) or the row role; it weighs P, while the coefficient multiplies the unpenalised tiles
    (stop-gradient). With NORMED the columns' inverse norms go into it, so that ``coef @ Y`` sums
    unit vectors."""
    _, rows_g, row_ok, _, row_lse, row_w = row
    _, _, _, _, COL_LSE, COL_W = seg
    keep = keep_mask(rows_g, row_ok, cols + col_offset, col_ok, GROUP_IDS, ROLE=ROLE)
    s_row = s
    s_col = s
    if has(ROLE, PEN_OWN | PEN_OTHER):
        if has(ROLE, PEN_COL):
            s_col = penalised(s, rows_g, cols + col_offset, penalty, ROLE=ROLE)
        else:
            s_row = penalised(s, rows_g, cols + col_offset, penalty, ROLE=ROLE)
    coef = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if has(ROLE, ROW):
        coef += tl.exp(tl.where(keep, s_row - row_lse[:, None], float("-inf"))) * row_w[:, None]
    if has(ROLE, COL):
        col_lse = tl.load(COL_LSE + cols, mask=col_ok, other=0.0)
        col_w = tl.load(COL_W + cols, mask=col_ok, other=0.0)
        coef += tl.exp(tl.where(keep, s_col - col_lse[None, :], float("-inf"))) * col_w[None, :]
    if NORMED:
        coef = coef * y_inv_norm[None, :]  # sum_j coef_ij r_j y_j = sum_j coef_ij (unit y_j), raw y in the sweep
    return coef


@triton.jit
def coefficients(c0, x, row, seg_a, seg_b, GROUP_IDS, n_cols, col_offset, dim, scale, penalty, A_ROLE: tl.constexpr,
                 B_ROLE: tl.constexpr, NORMED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """The staged tiles ``(coef_a, coef_b, cols, col_ok)`` of columns ``c0 ..`` of segments A and B:
    the coefficient tiles cast to the dot's operand type (the float32 tiles die here), and their
    columns."""
    cols = c0 + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    a_inv_norm, s_a, b_inv_norm, s_b = logit_pair(x, row, seg_a, seg_b, cols, col_ok, dim, scale, A_ROLE=A_ROLE,
                                                  B_ROLE=B_ROLE, NORMED=NORMED, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                                  BLOCK_D=BLOCK_D, PRECISION=PRECISION)
    A = seg_a[0]
    B = seg_b[0]
    coef_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=A.dtype.element_ty)
    coef_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=B.dtype.element_ty)
    if A_ROLE != 0:
        coef_a = coefficient(s_a, a_inv_norm, row, seg_a, cols, col_ok, col_offset, GROUP_IDS, penalty, ROLE=A_ROLE,
                             NORMED=NORMED, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N).to(A.dtype.element_ty)
    if B_ROLE != 0:
        coef_b = coefficient(s_b, b_inv_norm, row, seg_b, cols, col_ok, col_offset, GROUP_IDS, penalty, ROLE=B_ROLE,
                             NORMED=NORMED, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N).to(B.dtype.element_ty)
    return coef_a, coef_b, cols, col_ok


@triton.jit
def _times_chunk(acc, coef, seg, cols, col_ok, ks, k_ok, PRECISION: tl.constexpr):
    """acc + coef @ Y[cols, ks] for the segment ``seg``."""
    Y, stride_y_row, stride_y_dim, _, _, _ = seg
    y = tl.load(Y + cols.to(tl.int64)[:, None] * stride_y_row + ks[None, :] * stride_y_dim,
                mask=col_ok[:, None] & k_ok, other=0.0)
    return tl.dot(coef, y, acc, input_precision=PRECISION)


@triton.jit
def sweep(dst, x, partner, row, dots, staged0, staged1, seg_a, seg_b, dim, started, last, A_ROLE: tl.constexpr,
          B_ROLE: tl.constexpr, SPAN: tl.constexpr, FINISH: tl.constexpr, BLOCK_M: tl.constexpr,
          BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One sweep over D: the rows' float32 buffer (+)= the staged coefficient tiles times their
    candidates, ``coef_a0 A[cols0] + coef_b0 B[cols0] (+ coef_a1 A[cols1] + coef_b1 B[cols1] with SPAN
    = 2)``, one read-modify-write of BUF for all of them. ``started``: an earlier sweep stored the
    buffer (else this one stores without reading). ``last`` (FINISH has FUSED): the program's last
    sweep, which writes the gradient itself in OUT's dtype instead, ``factor * BUF (+ pos_coef_i
    POS_ROWS_i`` with PARTNER, the positive logit's term), and with DOTS returns dots + <x_i, grad_i>
    per row; those writes are masked by ``last``, not branched (triton 3.6 cannot pipeline a branch
    here), so ``grad_walk`` compiles FINISH into its last step only. A barrier after the sweep orders
    its stores before the next sweep's loads of the same rows, which other threads of the program may
    make."""
    BUF, stride_buf_row, stride_buf_dim, OUT, stride_out_row, stride_out_dim, factor = dst
    X, stride_x_row, stride_x_dim = x
    POS_ROWS, stride_pos_row, stride_pos_dim, pos_coef = partner
    rows, _, row_ok, _, _, _ = row
    coef_a0, coef_b0, cols0, ok0 = staged0
    coef_a1, coef_b1, cols1, ok1 = staged1
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
        if A_ROLE != 0:
            acc = _times_chunk(acc, coef_a0, seg_a, cols0, ok0, ks, k_ok, PRECISION=PRECISION)
        if B_ROLE != 0:
            acc = _times_chunk(acc, coef_b0, seg_b, cols0, ok0, ks, k_ok, PRECISION=PRECISION)
        if SPAN == 2:
            if A_ROLE != 0:
                acc = _times_chunk(acc, coef_a1, seg_a, cols1, ok1, ks, k_ok, PRECISION=PRECISION)
            if B_ROLE != 0:
                acc = _times_chunk(acc, coef_b1, seg_b, cols1, ok1, ks, k_ok, PRECISION=PRECISION)
        ok = row_ok[:, None] & k_ok
        buf = BUF + r64 * stride_buf_row + ks[None, :] * stride_buf_dim
        acc += tl.load(buf, mask=ok & started_rows[:, None], other=0.0)
        if has(FINISH, FUSED):  # masks, not a branch: the loop stays one block for the software pipeliner
            out_ok = ok & last_rows[:, None]
            grad = acc * factor
            if has(FINISH, PARTNER):
                partner_chunk = tl.load(POS_ROWS + r64 * stride_pos_row + ks[None, :] * stride_pos_dim, mask=out_ok,
                                        other=0.0)
                grad += pos_coef[:, None] * partner_chunk.to(tl.float32)
            tl.store(OUT + r64 * stride_out_row + ks[None, :] * stride_out_dim, grad.to(OUT.dtype.element_ty),
                     mask=out_ok)
            if has(FINISH, DOTS):
                x_chunk = tl.load(X + r64 * stride_x_row + ks[None, :] * stride_x_dim, mask=out_ok, other=0.0)
                dots += tl.sum(grad * x_chunk.to(tl.float32), 1)  # x is 0 unless last
            tl.store(buf, acc, mask=ok & (last_rows == 0)[:, None])
        else:
            tl.store(buf, acc, mask=ok)
    tl.debug_barrier()
    return dots


@triton.jit
def _walk_step(c0, dots, dst, x, partner, row, seg_a, seg_b, GROUP_IDS, n_cols, col_offset, dim, scale, penalty,
               started, last, A_ROLE: tl.constexpr, B_ROLE: tl.constexpr, SPAN: tl.constexpr, FINISH: tl.constexpr,
               NORMED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               PRECISION: tl.constexpr):
    """The SPAN column tiles from ``c0``: their coefficient tiles, then one ``sweep``."""
    staged0 = coefficients(c0, x, row, seg_a, seg_b, GROUP_IDS, n_cols, col_offset, dim, scale, penalty,
                           A_ROLE=A_ROLE, B_ROLE=B_ROLE, NORMED=NORMED, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                           BLOCK_D=BLOCK_D, PRECISION=PRECISION)
    staged1 = staged0  # read only with SPAN = 2
    if SPAN == 2:
        staged1 = coefficients(c0 + BLOCK_N, x, row, seg_a, seg_b, GROUP_IDS, n_cols, col_offset, dim, scale, penalty,
                               A_ROLE=A_ROLE, B_ROLE=B_ROLE, NORMED=NORMED, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                               BLOCK_D=BLOCK_D, PRECISION=PRECISION)
    return sweep(dst, x, partner, row, dots, staged0, staged1, seg_a, seg_b, dim, started, last, A_ROLE=A_ROLE,
                 B_ROLE=B_ROLE, SPAN=SPAN, FINISH=FINISH, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, PRECISION=PRECISION)


@triton.jit
def grad_walk(dots, dst, x, partner, row, seg_a, seg_b, GROUP_IDS, n_cols, col_offset, dim, scale, penalty, final,
              A_ROLE: tl.constexpr, B_ROLE: tl.constexpr, FIRST: tl.constexpr, SPAN: tl.constexpr,
              FINISH: tl.constexpr, NORMED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Walk segments A and B (each if its role is not 0) together, SPAN column tiles a step
    (``_walk_step``). FIRST: this is the program's first walk, whose first sweep stores instead of
    adding (the buffer needs no zeroing); ``final``: no walk follows, so its last sweep is the
    program's last. With FINISH (FUSED) the last step is peeled off the loop: only its sweep carries the
    masked writes of the gradient, the others are plain read-modify-writes of BUF. Returns dots
    (``sweep``)."""
    step: tl.constexpr = SPAN * BLOCK_N
    last_c0 = (tl.cdiv(n_cols, step) - 1) * step
    if has(FINISH, FUSED):
        end = last_c0
    else:
        end = n_cols
    for c0 in range(0, end, step):
        if FIRST:
            started = c0 > 0
        else:
            started = c0 >= 0
        dots = _walk_step(c0, dots, dst, x, partner, row, seg_a, seg_b, GROUP_IDS, n_cols, col_offset, dim, scale,
                          penalty, started, final, A_ROLE=A_ROLE, B_ROLE=B_ROLE, SPAN=SPAN, FINISH=0, NORMED=NORMED,
                          BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, PRECISION=PRECISION)
    if has(FINISH, FUSED):
        if FIRST:
            started = last_c0 > 0
        else:
            started = last_c0 >= 0
        dots = _walk_step(last_c0, dots, dst, x, partner, row, seg_a, seg_b, GROUP_IDS, n_cols, col_offset, dim,
                          scale, penalty, started, final, A_ROLE=A_ROLE, B_ROLE=B_ROLE, SPAN=SPAN, FINISH=FINISH,
                          NORMED=NORMED, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, PRECISION=PRECISION)
    return dots
