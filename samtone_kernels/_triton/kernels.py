"""The kernels: ``lse_kernel`` (forward: each anchor row's log-partition) and ``grad_kernel``
(backward: one launch per tensor that owns its rows, which writes the gradient itself unless NORMED).

The walks a launch makes are its role constexprs ``Q_ROLE``, ``D_ROLE``, ``N_ROLE``, one integer per
candidate segment from ``_plan.Launch.roles``: ROW (the program's rows are anchors of that segment's
block), COL (the segment's rows are anchors and the program's rows their candidates), DROP_SELF /
DROP_GROUP (the entries the block removes) and PEN_OWN / PEN_OTHER / PEN_COL (the q2d entries that
take the hardness penalty, ``_plan.HARDNESS``), read with ``tiles.has``; and for the grad kernel
``FINISH`` (``_plan.Launch.finish``: FUSED, PARTNER, DOTS). The walk itself is a config choice
(``configs``): PAIRED (the Q and D segments together, column tile by column tile, or each alone),
SPAN (column tiles per sweep of a lone segment in the backward), TRANSPOSED (the backward's sweeps
take their products transposed) or RESIDENT (the rows' tile and gradient on chip, D within one tile);
the hard-negative blocks come last.
Every launch writes its outputs without reading them first, so the autotuner may run it any number of
times on live buffers.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .configs import AUTOTUNE, DEFAULT_WALK, FLAGS, check_fits, configs, running_arch, usable_resident
from .sweeps import finish_rows, grad_walk, resident_walk
from .tiles import COL, DOTS, FUSED, PARTNER, ROW, has, inv_norms, lse_walk


@triton.autotune(
    configs=configs(grad=False, arch=running_arch()),
    key=["rows_bucket", "cols_bucket", "dim", "n_hard", *FLAGS],
    **AUTOTUNE,
)
@triton.jit
def lse_kernel(
    X,
    stride_x_row,
    stride_x_dim,
    X_INV_NORMS,
    Q,
    stride_q_row,
    stride_q_dim,
    Q_INV_NORMS,
    D,
    stride_d_row,
    stride_d_dim,
    D_INV_NORMS,
    NEG,
    stride_neg_row,
    stride_neg_k,
    stride_neg_dim,
    NEG_INV_NORMS,
    GROUP_IDS,
    THRESHOLDS,
    SCALE,
    LSE,
    n_rows,
    n_cols,
    row_offset,
    dim,
    n_hard,
    rows_bucket,
    cols_bucket,
    hardness,
    Q_ROLE: tl.constexpr,
    D_ROLE: tl.constexpr,
    N_ROLE: tl.constexpr,
    NORMED: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAIRED: tl.constexpr = DEFAULT_WALK[0],
):
    """LSE[rows] = log sum over the kept candidates of exp(scale * X[rows] . y) (plus the hardness
    penalty ``hardness * X[rows] . y`` on the entries the roles' PEN bits select). Anchor row i is
    candidate pair ``row_offset + i`` (the masks compare those indices); candidates Q, D [n_cols], NEG
    [n_cols, n_hard] (inverse norms NEG_INV_NORMS [n_hard, n_cols]). The roles hold ROW only: every
    walked segment is a row block of the anchors X."""
    tl.static_assert(has(Q_ROLE, ROW) or has(D_ROLE, ROW))
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_g = rows + row_offset
    row_ok = rows < n_rows
    scale = tl.load(SCALE)
    penalty = hardness / scale
    x = (X, stride_x_row, stride_x_dim)
    row = (rows, rows_g, row_ok, inv_norms(X_INV_NORMS, rows, row_ok, BLOCK=BLOCK_M, NORMED=NORMED), None, None)
    seg_q = (Q, stride_q_row, stride_q_dim, Q_INV_NORMS, None, None)  # no column statistics: row blocks only
    seg_d = (D, stride_d_row, stride_d_dim, D_INV_NORMS, None, None)
    pairs = (GROUP_IDS, THRESHOLDS)  # what the masks read per global pair index
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if PAIRED:  # the Q and D tiles of each column tile together
        m, l = lse_walk(
            m,
            l,
            x,
            row,
            seg_q,
            seg_d,
            pairs,
            n_cols,
            dim,
            scale,
            penalty,
            A_ROLE=Q_ROLE,
            B_ROLE=D_ROLE,
            NORMED=NORMED,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_D=BLOCK_D,
            PRECISION=PRECISION,
        )
    else:
        if has(Q_ROLE, ROW):
            m, l = lse_walk(
                m,
                l,
                x,
                row,
                seg_q,
                seg_q,
                pairs,
                n_cols,
                dim,
                scale,
                penalty,
                A_ROLE=Q_ROLE,
                B_ROLE=0,
                NORMED=NORMED,
                BLOCK_M=BLOCK_M,
                BLOCK_N=BLOCK_N,
                BLOCK_D=BLOCK_D,
                PRECISION=PRECISION,
            )
        if has(D_ROLE, ROW):
            m, l = lse_walk(
                m,
                l,
                x,
                row,
                seg_d,
                seg_d,
                pairs,
                n_cols,
                dim,
                scale,
                penalty,
                A_ROLE=D_ROLE,
                B_ROLE=0,
                NORMED=NORMED,
                BLOCK_M=BLOCK_M,
                BLOCK_N=BLOCK_N,
                BLOCK_D=BLOCK_D,
                PRECISION=PRECISION,
            )
    if has(N_ROLE, ROW):
        for k in range(0, n_hard):
            seg_n = (NEG + k * stride_neg_k, stride_neg_row, stride_neg_dim, NEG_INV_NORMS + k * n_cols, None, None)
            m, l = lse_walk(
                m,
                l,
                x,
                row,
                seg_n,
                seg_n,
                pairs,
                n_cols,
                dim,
                scale,
                penalty,
                A_ROLE=N_ROLE,
                B_ROLE=0,
                NORMED=NORMED,
                BLOCK_M=BLOCK_M,
                BLOCK_N=BLOCK_N,
                BLOCK_D=BLOCK_D,
                PRECISION=PRECISION,
            )
    # Rows past N never reach the store, and a row with nothing kept (a document whose only
    # candidates are its group's, with d2d alone) has m = -inf: give both l = 1 so log() sees no
    # zero; the latter's log-partition is then -inf, log(0).
    tl.store(LSE + rows, m + tl.log(tl.where(row_ok & (l > 0), l, 1.0)), mask=row_ok)


GRAD_KEY = ["rows_bucket", "cols_bucket", "dim", "n_hard", *FLAGS, "FINISH"]


@triton.autotune(configs=configs(grad=True, arch=running_arch()), key=GRAD_KEY, **AUTOTUNE)
@triton.jit
def grad_kernel(
    OUT,
    stride_out_row,
    stride_out_block,
    stride_out_dim,
    BUF,
    stride_buf_row,
    stride_buf_block,
    stride_buf_dim,
    X,
    stride_x_row,
    stride_x_block,
    stride_x_dim,
    X_INV_NORMS,
    Q,
    stride_q_row,
    stride_q_dim,
    Q_INV_NORMS,
    D,
    stride_d_row,
    stride_d_dim,
    D_INV_NORMS,
    NEG,
    stride_neg_row,
    stride_neg_k,
    stride_neg_dim,
    NEG_INV_NORMS,
    GROUP_IDS,
    THRESHOLDS,
    SCALE,
    ROW_LSE,
    ROW_W,
    Q_LSE,
    Q_W,
    D_LSE,
    D_W,
    POS_ROWS,
    stride_pos_row,
    stride_pos_dim,
    POS_COEF,
    FACTOR,
    DOTS_OUT,
    n_rows,
    n_cols,
    row_offset,
    col_offset,
    dim,
    n_hard,
    rows_bucket,
    cols_bucket,
    hardness,
    Q_ROLE: tl.constexpr,
    D_ROLE: tl.constexpr,
    N_ROLE: tl.constexpr,
    NORMED: tl.constexpr,
    PRECISION: tl.constexpr,
    FINISH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAIRED: tl.constexpr = DEFAULT_WALK[0],
    SPAN: tl.constexpr = DEFAULT_WALK[1],
    RESIDENT: tl.constexpr = False,
    TRANSPOSED: tl.constexpr = False,
):
    """The gradient of X's rows: sum over the walked segments of ``coef @ Y`` (``tiles.coefficient``).

    X [n_rows, K, D] (axis 1 of the grid walks the K row blocks of hard negatives; K = 1 otherwise,
    inverse norms X_INV_NORMS [K, n_rows]); BUF (float32) and OUT (X's dtype) are shaped like X. Row
    statistics ROW_LSE, ROW_W (local row index) serve the row blocks, Q_LSE, Q_W and D_LSE, D_W the
    column blocks of the Q and D segments. Column j of Q and D is pair ``col_offset + j``; row i is
    pair ``row_offset + i``. The roles' PEN bits: the q2d entries whose softmax took the hardness
    penalty (column role on Q, row role on D, N).

    The walks (``tiles.grad_walk``): with PAIRED, the Q and D segments together, their tiles at the
    same columns from one load of the row tile and added in one sweep over D (``tiles.sweep``: one
    read-modify-write of BUF for both); otherwise each segment alone, SPAN column tiles per sweep;
    then each block of hard negatives, SPAN column tiles per sweep. Without FINISH every sweep leaves
    BUF unscaled for ``epilogue_kernel``; with FUSED the program's last sweep writes OUT = FACTOR * BUF
    (+ POS_COEF_i POS_ROWS_i with PARTNER: the positive logit's term) and, with DOTS, DOTS_OUT
    [n_rows * K] = <x, OUT> per row.
    """
    WALK_Q: tl.constexpr = has(Q_ROLE, ROW | COL)
    WALK_D: tl.constexpr = has(D_ROLE, ROW | COL)
    WALK_N: tl.constexpr = has(N_ROLE, ROW)
    tl.static_assert(WALK_Q or WALK_D)  # so the hard negatives' walk is never the first
    tl.static_assert(SPAN == 1 or SPAN == 2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_g = rows + row_offset
    row_ok = rows < n_rows
    blk = tl.program_id(1).to(tl.int64)
    X = X + blk * stride_x_block
    OUT = OUT + blk * stride_out_block
    BUF = BUF + blk * stride_buf_block
    scale = tl.load(SCALE)
    penalty = hardness / scale
    factor = tl.load(FACTOR)
    x_inv_norm = inv_norms(X_INV_NORMS + blk * n_rows, rows, row_ok, BLOCK=BLOCK_M, NORMED=NORMED)
    row_lse = tl.zeros((BLOCK_M,), dtype=tl.float32)
    row_w = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if has(Q_ROLE, ROW) or has(D_ROLE, ROW) or WALK_N:
        row_lse = tl.load(ROW_LSE + rows, mask=row_ok, other=0.0)
        row_w = tl.load(ROW_W + rows, mask=row_ok, other=0.0)
    pos_coef = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if has(FINISH, PARTNER):
        pos_coef = tl.load(POS_COEF + rows, mask=row_ok, other=0.0)
    x = (X, stride_x_row, stride_x_dim)
    row = (rows, rows_g, row_ok, x_inv_norm, row_lse, row_w)
    dst = (BUF, stride_buf_row, stride_buf_dim, OUT, stride_out_row, stride_out_dim, factor)
    partner = (POS_ROWS, stride_pos_row, stride_pos_dim, pos_coef)
    seg_q = (Q, stride_q_row, stride_q_dim, Q_INV_NORMS, Q_LSE, Q_W)
    seg_d = (D, stride_d_row, stride_d_dim, D_INV_NORMS, D_LSE, D_W)
    pairs = (GROUP_IDS, THRESHOLDS)  # what the masks read per global pair index
    dots = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # Which walk is the program's last is known here: the hard negatives' when there are any (N_ROLE
    # comes with at least one block: plan.Launch.roles), else D's, else Q's. Only that walk's last
    # step writes the gradient (FINISH); its ``final`` is a true scalar.
    if RESIDENT:  # D within one tile: the rows' tile and their gradient stay on chip (resident_walk)
        ks = tl.arange(0, BLOCK_D)
        r64 = rows.to(tl.int64)[:, None]
        ok = row_ok[:, None] & (ks[None, :] < dim)
        x_tile = tl.load(X + r64 * stride_x_row + ks[None, :] * stride_x_dim, mask=ok, other=0.0)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        if PAIRED and WALK_Q and WALK_D:
            acc = resident_walk(
                acc,
                x_tile,
                row,
                seg_q,
                seg_d,
                pairs,
                n_cols,
                col_offset,
                dim,
                scale,
                penalty,
                A_ROLE=Q_ROLE,
                B_ROLE=D_ROLE,
                NORMED=NORMED,
                BLOCK_M=BLOCK_M,
                BLOCK_N=BLOCK_N,
                BLOCK_D=BLOCK_D,
                PRECISION=PRECISION,
            )
        else:
            if WALK_Q:
                acc = resident_walk(
                    acc,
                    x_tile,
                    row,
                    seg_q,
                    seg_q,
                    pairs,
                    n_cols,
                    col_offset,
                    dim,
                    scale,
                    penalty,
                    A_ROLE=Q_ROLE,
                    B_ROLE=0,
                    NORMED=NORMED,
                    BLOCK_M=BLOCK_M,
                    BLOCK_N=BLOCK_N,
                    BLOCK_D=BLOCK_D,
                    PRECISION=PRECISION,
                )
            if WALK_D:
                acc = resident_walk(
                    acc,
                    x_tile,
                    row,
                    seg_d,
                    seg_d,
                    pairs,
                    n_cols,
                    col_offset,
                    dim,
                    scale,
                    penalty,
                    A_ROLE=D_ROLE,
                    B_ROLE=0,
                    NORMED=NORMED,
                    BLOCK_M=BLOCK_M,
                    BLOCK_N=BLOCK_N,
                    BLOCK_D=BLOCK_D,
                    PRECISION=PRECISION,
                )
        if WALK_N:
            for k in range(0, n_hard):
                seg_n = (NEG + k * stride_neg_k, stride_neg_row, stride_neg_dim, NEG_INV_NORMS + k * n_cols, D_LSE, D_W)
                acc = resident_walk(
                    acc,
                    x_tile,
                    row,
                    seg_n,
                    seg_n,
                    pairs,
                    n_cols,
                    col_offset,
                    dim,
                    scale,
                    penalty,
                    A_ROLE=N_ROLE,
                    B_ROLE=0,
                    NORMED=NORMED,
                    BLOCK_M=BLOCK_M,
                    BLOCK_N=BLOCK_N,
                    BLOCK_D=BLOCK_D,
                    PRECISION=PRECISION,
                )
        if has(FINISH, FUSED):
            dots = finish_rows(acc, dots, r64, ks, ok, dst, x, partner, FINISH=FINISH)
        else:  # the epilogue finishes the rows from the buffer
            tl.store(BUF + r64 * stride_buf_row + ks[None, :] * stride_buf_dim, acc, mask=ok)
    else:
        true = n_cols > 0
        if PAIRED and WALK_Q and WALK_D:  # one walk, the Q and D tiles of a column tile in one sweep
            dots = grad_walk(
                dots,
                dst,
                x,
                partner,
                row,
                seg_q,
                seg_d,
                pairs,
                n_cols,
                col_offset,
                dim,
                scale,
                penalty,
                true,
                A_ROLE=Q_ROLE,
                B_ROLE=D_ROLE,
                FIRST=True,
                SPAN=1,
                FINISH=0 if WALK_N else FINISH,
                NORMED=NORMED,
                BLOCK_M=BLOCK_M,
                BLOCK_N=BLOCK_N,
                BLOCK_D=BLOCK_D,
                PRECISION=PRECISION,
                TRANSPOSED=TRANSPOSED,
            )
        else:  # each segment alone, SPAN column tiles per sweep
            if WALK_Q:
                dots = grad_walk(
                    dots,
                    dst,
                    x,
                    partner,
                    row,
                    seg_q,
                    seg_q,
                    pairs,
                    n_cols,
                    col_offset,
                    dim,
                    scale,
                    penalty,
                    true,
                    A_ROLE=Q_ROLE,
                    B_ROLE=0,
                    FIRST=True,
                    SPAN=SPAN,
                    FINISH=0 if WALK_D or WALK_N else FINISH,
                    NORMED=NORMED,
                    BLOCK_M=BLOCK_M,
                    BLOCK_N=BLOCK_N,
                    BLOCK_D=BLOCK_D,
                    PRECISION=PRECISION,
                    TRANSPOSED=TRANSPOSED,
                )
            if WALK_D:
                dots = grad_walk(
                    dots,
                    dst,
                    x,
                    partner,
                    row,
                    seg_d,
                    seg_d,
                    pairs,
                    n_cols,
                    col_offset,
                    dim,
                    scale,
                    penalty,
                    true,
                    A_ROLE=D_ROLE,
                    B_ROLE=0,
                    FIRST=not WALK_Q,
                    SPAN=SPAN,
                    FINISH=0 if WALK_N else FINISH,
                    NORMED=NORMED,
                    BLOCK_M=BLOCK_M,
                    BLOCK_N=BLOCK_N,
                    BLOCK_D=BLOCK_D,
                    PRECISION=PRECISION,
                    TRANSPOSED=TRANSPOSED,
                )
        if WALK_N:
            for k in range(0, n_hard):
                seg_n = (NEG + k * stride_neg_k, stride_neg_row, stride_neg_dim, NEG_INV_NORMS + k * n_cols, D_LSE, D_W)
                dots = grad_walk(
                    dots,
                    dst,
                    x,
                    partner,
                    row,
                    seg_n,
                    seg_n,
                    pairs,
                    n_cols,
                    col_offset,
                    dim,
                    scale,
                    penalty,
                    k == n_hard - 1,
                    A_ROLE=N_ROLE,
                    B_ROLE=0,
                    FIRST=False,
                    SPAN=SPAN,
                    FINISH=FINISH,
                    NORMED=NORMED,
                    BLOCK_M=BLOCK_M,
                    BLOCK_N=BLOCK_N,
                    BLOCK_D=BLOCK_D,
                    PRECISION=PRECISION,
                    TRANSPOSED=TRANSPOSED,
                )
    if has(FINISH, DOTS):
        tl.store(DOTS_OUT + rows * tl.num_programs(1) + blk, dots, mask=row_ok)


#: ``grad_kernel`` over its configs less the resident ones, for a D no resident config serves
#: (``grad_launcher``): where one config is left the autotuner then never benchmarks (triton 3.6
#: benchmarks even a pruned list of one).
wide_grad_kernel = triton.autotune(
    configs=[c for c in grad_kernel.configs if not c.kwargs.get("RESIDENT", False)], key=GRAD_KEY, **AUTOTUNE
)(grad_kernel.fn)


def grad_launcher(dim: int, n_rows: int):
    """The autotuned grad kernel for dimension D and ``n_rows`` rows: ``grad_kernel``, or where it
    has resident configs and none would be kept for this problem (``configs.usable_resident``),
    ``wide_grad_kernel`` over the others. Raises where no config serves D (a resident config
    narrower than D alone)."""
    check_fits(grad_kernel.configs, dim)
    resident = [c for c in grad_kernel.configs if c.kwargs.get("RESIDENT", False)]
    if (
        not resident
        or any(usable_resident(c, dim, n_rows) for c in resident)
        or len(resident) == len(grad_kernel.configs)
    ):
        return grad_kernel
    wide = [c for c in grad_kernel.configs if not c.kwargs.get("RESIDENT", False)]
    if list(map(id, wide_grad_kernel.configs)) != list(map(id, wide)):  # grad_kernel's (tests replace them)
        wide_grad_kernel.configs, wide_grad_kernel.cache = wide, {}
    return wide_grad_kernel


AUTOTUNED = (lse_kernel, grad_kernel)
