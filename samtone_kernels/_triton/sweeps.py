"""``@triton.jit`` helpers of the backward: coefficient tiles, and the sweeps over D that add their
``coef @ Y`` to the rows' gradient, walked column tile by column tile (``grad_walk``). The tuples they
pass are those of ``tiles`` (``x``, ``row``, ``seg``) and ``dst = (BUF, stride_buf_row,
stride_buf_dim, OUT, stride_out_row, stride_out_dim, factor)``, the float32 buffer of the rows'
gradient and the gradient itself, and ``partner = (POS_ROWS, stride_row, stride_dim, pos_coef)``, the
positive logit's partner rows.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import (
    COL,
    DOTS,
    FUSED,
    PARTNER,
    PEN_COL,
    PEN_OTHER,
    PEN_OWN,
    ROW,
    has,
    inv_norms,
    keep_mask,
    logit_pair,
    penalised,
    scaled,
    unpresumed,
)


@triton.jit
def coefficient(
    s,
    y_inv_norm,
    row,
    seg,
    cols,
    col_ok,
    col_offset,
    pairs,
    penalty,
    ROLE: tl.constexpr,
    NORMED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The gradient coefficient [BLOCK_M, BLOCK_N] (float32) of a logit tile s, for every block the
    tile serves: ROW, the rows are anchors, ``w_i exp(S - lse_i)`` (the row statistics); COL, the
    columns are anchors (``s(y_j, x_i) = S_ij``), ``w_j exp(S - lse_j)`` with the segment's statistics
    (local column index). PEN bits: the hardness penalty's entries, in the softmax of the column role
    (PEN_COL) or the row role; it weighs P, while the coefficient multiplies the unpenalised tiles
    (stop-gradient). With NORMED the columns' inverse norms go into it, so that ``coef @ Y`` sums
    unit vectors."""
    _, rows_g, row_ok, _, row_lse, row_w = row
    _, _, _, _, COL_LSE, COL_W = seg
    cols_g = cols + col_offset
    keep = keep_mask(rows_g, row_ok, cols_g, col_ok, pairs, ROLE=ROLE)
    s_row = s
    s_col = s
    if has(ROLE, PEN_OWN | PEN_OTHER):
        if has(ROLE, PEN_COL):
            s_col = penalised(s, rows_g, cols_g, penalty, ROLE=ROLE)
        else:
            s_row = penalised(s, rows_g, cols_g, penalty, ROLE=ROLE)
    coef = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Each role's margin mask is made where it is used, so the two are never live together.
    if has(ROLE, ROW):
        keep_row = unpresumed(keep, s, rows_g, row_ok, cols_g, col_ok, pairs, ROLE=ROLE, COLUMNS=False)
        coef += tl.exp(tl.where(keep_row, s_row - row_lse[:, None], float("-inf"))) * row_w[:, None]
    if has(ROLE, COL):
        col_lse = tl.load(COL_LSE + cols, mask=col_ok, other=0.0)
        col_w = tl.load(COL_W + cols, mask=col_ok, other=0.0)
        keep_col = unpresumed(keep, s, rows_g, row_ok, cols_g, col_ok, pairs, ROLE=ROLE, COLUMNS=True)
        coef += tl.exp(tl.where(keep_col, s_col - col_lse[None, :], float("-inf"))) * col_w[None, :]
    if NORMED:
        coef = coef * y_inv_norm[None, :]  # sum_j coef_ij r_j y_j = sum_j coef_ij (unit y_j), raw y in the sweep
    return coef


@triton.jit
def coefficients(
    c0,
    x,
    row,
    seg_a,
    seg_b,
    pairs,
    n_cols,
    col_offset,
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
    """The staged tiles ``(coef_a, coef_b, cols, col_ok)`` of columns ``c0 ..`` of segments A and B:
    the coefficient tiles cast to the dot's operand type (the float32 tiles die here), and their
    columns."""
    cols = c0 + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    a_inv_norm, s_a, b_inv_norm, s_b = logit_pair(
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
    A = seg_a[0]
    B = seg_b[0]
    coef_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=A.dtype.element_ty)
    coef_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=B.dtype.element_ty)
    if A_ROLE != 0:
        coef_a = coefficient(
            s_a,
            a_inv_norm,
            row,
            seg_a,
            cols,
            col_ok,
            col_offset,
            pairs,
            penalty,
            ROLE=A_ROLE,
            NORMED=NORMED,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
        ).to(A.dtype.element_ty)
    if B_ROLE != 0:
        coef_b = coefficient(
            s_b,
            b_inv_norm,
            row,
            seg_b,
            cols,
            col_ok,
            col_offset,
            pairs,
            penalty,
            ROLE=B_ROLE,
            NORMED=NORMED,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
        ).to(B.dtype.element_ty)
    return coef_a, coef_b, cols, col_ok


@triton.jit
def _times_chunk(acc, coef, seg, cols, col_ok, ks, k_ok, PRECISION: tl.constexpr, TRANSPOSED: tl.constexpr):
    """acc + coef @ Y[cols, ks] for the segment ``seg`` ([BLOCK_M, BLOCK_D]); TRANSPOSED: the same
    product transposed, acc^T + Y[cols, ks]^T @ coef^T, with ``acc``, ``coef`` and ``k_ok`` passed
    transposed ([BLOCK_D, BLOCK_M], [BLOCK_N, BLOCK_M], [BLOCK_D, 1])."""
    Y, stride_y_row, stride_y_dim, _, _, _ = seg
    c64 = cols.to(tl.int64)
    if TRANSPOSED:
        y_t = tl.load(
            Y + c64[None, :] * stride_y_row + ks[:, None] * stride_y_dim, mask=col_ok[None, :] & k_ok, other=0.0
        )
        return tl.dot(y_t, coef, acc, input_precision=PRECISION)
    else:
        y = tl.load(
            Y + c64[:, None] * stride_y_row + ks[None, :] * stride_y_dim, mask=col_ok[:, None] & k_ok, other=0.0
        )
        return tl.dot(coef, y, acc, input_precision=PRECISION)


@triton.jit
def finish_rows(acc, dots, r64, ks, out_ok, dst, x, partner, FINISH: tl.constexpr):
    """Write the rows' gradient from their float32 sum ``acc`` [BLOCK_M, BLOCK_D] (columns ``ks`` of D)
    where ``out_ok``: ``OUT = factor * acc (+ pos_coef_i POS_ROWS_i`` with PARTNER, the positive
    logit's term) in OUT's dtype; with DOTS, returns dots + <x_i, grad_i> per row."""
    _, _, _, OUT, stride_out_row, stride_out_dim, factor = dst
    X, stride_x_row, stride_x_dim = x
    POS_ROWS, stride_pos_row, stride_pos_dim, pos_coef = partner
    grad = acc * factor
    if has(FINISH, PARTNER):
        partner_chunk = tl.load(POS_ROWS + r64 * stride_pos_row + ks[None, :] * stride_pos_dim, mask=out_ok, other=0.0)
        grad += pos_coef[:, None] * partner_chunk.to(tl.float32)
    tl.store(OUT + r64 * stride_out_row + ks[None, :] * stride_out_dim, grad.to(OUT.dtype.element_ty), mask=out_ok)
    if has(FINISH, DOTS):
        x_chunk = tl.load(X + r64 * stride_x_row + ks[None, :] * stride_x_dim, mask=out_ok, other=0.0)
        dots += tl.sum(grad * x_chunk.to(tl.float32), 1)  # x is 0 where the rows are not written
    return dots


@triton.jit
def sweep(
    dst,
    x,
    partner,
    row,
    dots,
    staged0,
    staged1,
    seg_a,
    seg_b,
    dim,
    started,
    last,
    A_ROLE: tl.constexpr,
    B_ROLE: tl.constexpr,
    SPAN: tl.constexpr,
    FINISH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    TRANSPOSED: tl.constexpr = False,
):
    """One sweep over D: the rows' float32 buffer (+)= the staged coefficient tiles times their
    candidates, ``coef_a0 A[cols0] + coef_b0 B[cols0] (+ coef_a1 A[cols1] + coef_b1 B[cols1] with SPAN
    = 2)``, one read-modify-write of BUF for all of them. ``started``: an earlier sweep stored the
    buffer (else this one stores without reading). ``last`` (FINISH has FUSED): the program's last
    sweep, which writes the gradient itself in OUT's dtype instead, ``factor * BUF (+ pos_coef_i
    POS_ROWS_i`` with PARTNER, the positive logit's term), and with DOTS returns dots + <x_i, grad_i>
    per row; those writes are masked by ``last``, not branched (triton 3.6 cannot pipeline a branch
    here), so ``grad_walk`` compiles FINISH into its last step only. A barrier after the sweep orders
    its stores before the next sweep's loads of the same rows, which other threads of the program may
    make. TRANSPOSED: each product as its transpose, ``BUF^T += Y[cols]^T coef^T``, so that on sm_90
    each coefficient tile is wgmma's B operand, read from shared memory as it is in every chunk of D
    (as the A operand it is loaded into registers again per chunk); the buffer is read and written
    through transposed pointers, and the last sweep transposes its sum back for the gradient."""
    BUF, stride_buf_row, stride_buf_dim, _, _, _, _ = dst
    rows, _, row_ok, _, _, _ = row
    coef_a0, coef_b0, cols0, ok0 = staged0
    coef_a1, coef_b1, cols1, ok1 = staged1
    offs_k = tl.arange(0, BLOCK_D)
    r64 = rows.to(tl.int64)[:, None]
    # The flags as row vectors for the masks: under the interpreter they can be Python bools (the sizes
    # they come from are Python ints there), which a mask cannot take.
    started_rows = tl.full((BLOCK_M,), 1, tl.int1) & started
    last_rows = tl.full((BLOCK_M,), 1, tl.int1) & last
    if TRANSPOSED:  # (once per sweep, outside the loop over D)
        coef_a0, coef_b0 = tl.trans(coef_a0), tl.trans(coef_b0)
        coef_a1, coef_b1 = tl.trans(coef_a1), tl.trans(coef_b1)
    for k0 in range(0, dim, BLOCK_D):
        ks = k0 + offs_k
        out_ok = row_ok[:, None] & (ks[None, :] < dim)  # the gradient's [BLOCK_M, BLOCK_D] chunk
        if TRANSPOSED:
            k_ok = ks[:, None] < dim
            ok = row_ok[None, :] & k_ok
            buf = BUF + rows.to(tl.int64)[None, :] * stride_buf_row + ks[:, None] * stride_buf_dim
            started_mask = started_rows[None, :]
            not_last = (last_rows == 0)[None, :]
        else:
            k_ok = ks[None, :] < dim
            ok = out_ok
            buf = BUF + r64 * stride_buf_row + ks[None, :] * stride_buf_dim
            started_mask = started_rows[:, None]
            not_last = (last_rows == 0)[:, None]
        # The buffer's load comes first (issued before any MMA wait), and each product after the first
        # goes into its own accumulator, added after: chained through one accumulator, Triton lays the
        # chain's first dot out with every warp along M (its choice for FlashAttention's chained dots),
        # and on sm_90 both warpgroups of a 64-row tile then compute the same product. The accumulators
        # start from ``zero``, a run-time zero, which Triton cannot fold back into one chain as it folds
        # ``dot(a, b, 0) + c`` (tools/kernel_analysis/tensor_cores.py; the compile check counts it).
        acc = tl.load(buf, mask=ok & started_mask, other=0.0)
        zero = acc * 0.0  # (a non-finite buffer gives NaN here: the gradient is non-finite either way)
        if A_ROLE != 0:
            acc = _times_chunk(acc, coef_a0, seg_a, cols0, ok0, ks, k_ok, PRECISION, TRANSPOSED)
        if B_ROLE != 0:
            acc += _times_chunk(zero, coef_b0, seg_b, cols0, ok0, ks, k_ok, PRECISION, TRANSPOSED)
        if SPAN == 2:
            if A_ROLE != 0:
                acc += _times_chunk(zero, coef_a1, seg_a, cols1, ok1, ks, k_ok, PRECISION, TRANSPOSED)
            if B_ROLE != 0:
                acc += _times_chunk(zero, coef_b1, seg_b, cols1, ok1, ks, k_ok, PRECISION, TRANSPOSED)
        if has(FINISH, FUSED):  # masks, not a branch: the loop stays one block for the software pipeliner
            if TRANSPOSED:
                rows_acc = tl.trans(acc)
            else:
                rows_acc = acc
            dots = finish_rows(rows_acc, dots, r64, ks, out_ok & last_rows[:, None], dst, x, partner, FINISH=FINISH)
            tl.store(buf, acc, mask=ok & not_last)
        else:
            tl.store(buf, acc, mask=ok)
    tl.debug_barrier()
    return dots


@triton.jit
def _walk_step(
    c0,
    dots,
    dst,
    x,
    partner,
    row,
    seg_a,
    seg_b,
    pairs,
    n_cols,
    col_offset,
    dim,
    scale,
    penalty,
    started,
    last,
    A_ROLE: tl.constexpr,
    B_ROLE: tl.constexpr,
    SPAN: tl.constexpr,
    FINISH: tl.constexpr,
    NORMED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    TRANSPOSED: tl.constexpr = False,
):
    """The SPAN column tiles from ``c0``: their coefficient tiles, then one ``sweep``."""
    staged0 = coefficients(
        c0,
        x,
        row,
        seg_a,
        seg_b,
        pairs,
        n_cols,
        col_offset,
        dim,
        scale,
        penalty,
        A_ROLE=A_ROLE,
        B_ROLE=B_ROLE,
        NORMED=NORMED,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
        PRECISION=PRECISION,
    )
    staged1 = staged0  # read only with SPAN = 2
    if SPAN == 2:
        staged1 = coefficients(
            c0 + BLOCK_N,
            x,
            row,
            seg_a,
            seg_b,
            pairs,
            n_cols,
            col_offset,
            dim,
            scale,
            penalty,
            A_ROLE=A_ROLE,
            B_ROLE=B_ROLE,
            NORMED=NORMED,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_D=BLOCK_D,
            PRECISION=PRECISION,
        )
    return sweep(
        dst,
        x,
        partner,
        row,
        dots,
        staged0,
        staged1,
        seg_a,
        seg_b,
        dim,
        started,
        last,
        A_ROLE=A_ROLE,
        B_ROLE=B_ROLE,
        SPAN=SPAN,
        FINISH=FINISH,
        BLOCK_M=BLOCK_M,
        BLOCK_D=BLOCK_D,
        PRECISION=PRECISION,
        TRANSPOSED=TRANSPOSED,
    )


@triton.jit
def grad_walk(
    dots,
    dst,
    x,
    partner,
    row,
    seg_a,
    seg_b,
    pairs,
    n_cols,
    col_offset,
    dim,
    scale,
    penalty,
    final,
    A_ROLE: tl.constexpr,
    B_ROLE: tl.constexpr,
    FIRST: tl.constexpr,
    SPAN: tl.constexpr,
    FINISH: tl.constexpr,
    NORMED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    TRANSPOSED: tl.constexpr = False,
):
    """Walk segments A and B (each if its role is not 0) together, SPAN column tiles a step
    (``_walk_step``; TRANSPOSED: its products transposed, ``sweep``). FIRST: this is the program's
    first walk, whose first sweep stores instead of adding (the buffer needs no zeroing); ``final``:
    no walk follows, so its last sweep is the program's last. With FINISH (FUSED) the last step is
    peeled off the loop: only its sweep carries the masked writes of the gradient, the others are
    plain read-modify-writes of BUF. Returns dots (``sweep``)."""
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
        dots = _walk_step(
            c0,
            dots,
            dst,
            x,
            partner,
            row,
            seg_a,
            seg_b,
            pairs,
            n_cols,
            col_offset,
            dim,
            scale,
            penalty,
            started,
            final,
            A_ROLE=A_ROLE,
            B_ROLE=B_ROLE,
            SPAN=SPAN,
            FINISH=0,
            NORMED=NORMED,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_D=BLOCK_D,
            PRECISION=PRECISION,
            TRANSPOSED=TRANSPOSED,
        )
    if has(FINISH, FUSED):
        if FIRST:
            started = last_c0 > 0
        else:
            started = last_c0 >= 0
        dots = _walk_step(
            last_c0,
            dots,
            dst,
            x,
            partner,
            row,
            seg_a,
            seg_b,
            pairs,
            n_cols,
            col_offset,
            dim,
            scale,
            penalty,
            started,
            final,
            A_ROLE=A_ROLE,
            B_ROLE=B_ROLE,
            SPAN=SPAN,
            FINISH=FINISH,
            NORMED=NORMED,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_D=BLOCK_D,
            PRECISION=PRECISION,
            TRANSPOSED=TRANSPOSED,
        )
    return dots


@triton.jit
def _resident_tile(
    acc,
    x_tile,
    row,
    seg,
    cols,
    col_ok,
    k_ok,
    col_offset,
    pairs,
    scale,
    penalty,
    ROLE: tl.constexpr,
    NORMED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc + coef @ Y[cols] for one column tile of a segment, the whole of D at once: the candidate
    tile is loaded once and serves both the logits ``x_tile @ Y[cols]^T`` and the product."""
    Y, stride_y_row, stride_y_dim, Y_INV_NORMS, _, _ = seg
    _, _, _, x_inv_norm, _, _ = row
    ks = tl.arange(0, BLOCK_D)
    y = tl.load(
        Y + cols.to(tl.int64)[:, None] * stride_y_row + ks[None, :] * stride_y_dim,
        mask=col_ok[:, None] & k_ok,
        other=0.0,
    )
    s = tl.dot(x_tile, tl.trans(y), input_precision=PRECISION)
    y_inv_norm = inv_norms(Y_INV_NORMS, cols, col_ok, BLOCK=BLOCK_N, NORMED=NORMED)
    s = scaled(s, x_inv_norm, y_inv_norm, scale, NORMED=NORMED)
    coef = coefficient(
        s,
        y_inv_norm,
        row,
        seg,
        cols,
        col_ok,
        col_offset,
        pairs,
        penalty,
        ROLE=ROLE,
        NORMED=NORMED,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
    )
    return tl.dot(coef.to(Y.dtype.element_ty), y, acc, input_precision=PRECISION)


@triton.jit
def resident_walk(
    acc,
    x_tile,
    row,
    seg_a,
    seg_b,
    pairs,
    n_cols,
    col_offset,
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
    """The walk of the RESIDENT grad kernel (D <= BLOCK_D): the rows' tile ``x_tile`` [BLOCK_M,
    BLOCK_D] and their float32 gradient sum ``acc`` stay on chip across every column tile of
    segments A and B (each if its role is not 0), FlashAttention-2's dQ loop: per column tile, one
    load of each candidate tile, its logits, coefficients and ``coef @ Y`` added to ``acc``; no
    float32 buffer, no sweep over D. Returns acc."""
    k_ok = tl.arange(0, BLOCK_D)[None, :] < dim
    for c0 in range(0, n_cols, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        # B's product in its own accumulator from a run-time zero, added after (see ``sweep``).
        zero = acc * 0.0
        if A_ROLE != 0:
            acc = _resident_tile(
                acc,
                x_tile,
                row,
                seg_a,
                cols,
                col_ok,
                k_ok,
                col_offset,
                pairs,
                scale,
                penalty,
                ROLE=A_ROLE,
                NORMED=NORMED,
                BLOCK_M=BLOCK_M,
                BLOCK_N=BLOCK_N,
                BLOCK_D=BLOCK_D,
                PRECISION=PRECISION,
            )
        if B_ROLE != 0:
            acc += _resident_tile(
                zero,
                x_tile,
                row,
                seg_b,
                cols,
                col_ok,
                k_ok,
                col_offset,
                pairs,
                scale,
                penalty,
                ROLE=B_ROLE,
                NORMED=NORMED,
                BLOCK_M=BLOCK_M,
                BLOCK_N=BLOCK_N,
                BLOCK_D=BLOCK_D,
                PRECISION=PRECISION,
            )
    return acc
