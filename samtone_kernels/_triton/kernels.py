"""The kernels and their autotuning: ``lse_kernel`` (forward), ``grad_kernel`` (backward, one launch
per tensor that owns its rows, which writes the gradient itself unless NORMED), ``epilogue_kernel``
(a float32 gradient buffer to the input dtype, for NORMED launches and those with no walk).

The walks a launch makes are its role constexprs ``Q_ROLE``, ``D_ROLE``, ``N_ROLE``, one integer per
candidate segment from ``_plan.Launch.roles``: ROW (the program's rows are anchors of that segment's
block), COL (the segment's rows are anchors and the program's rows their candidates), DROP_SELF /
DROP_GROUP (the entries the block removes) and PEN_OWN / PEN_OTHER / PEN_COL (the q2d entries that
take the hardness penalty, ``_plan.HARDNESS``), read with ``tiles.has``; and for the grad kernel
``FINISH`` (``_plan.Launch.finish``: FUSED, PARTNER, DOTS). The walk itself is a config choice:
PAIRED (the Q and D segments together, column tile by column tile, or each alone), SPAN (column
tiles per sweep of a lone segment in the backward); the hard-negative blocks come last.

Autotuning: the key holds every flag (each variant tunes its own tiles), the dtype, D, H and the
batch sizes rounded up to a power of two (``rows_bucket``, ``cols_bucket``), so a new batch size
within the bucket (an epoch's short last batch) reuses the tuned tiles. Configs whose shared memory
would exceed the running device's limit are pruned before they compile (``shared_bytes`` bounds
it; the GPU compile check tests that bound). Every launch writes its outputs without reading them
first, so the autotuner may run it any number of times on live buffers.
``SAMTONE_TRITON_CONFIG="BLOCK_M,BLOCK_N,BLOCK_D,num_warps,num_stages"`` pins one config (no tuning).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .._constants import NORM_EPS, interpreting
from .tiles import COL, DOTS, PARTNER, ROW, grad_walk, has, inv_norms, lse_walk

INTERPRETING = interpreting()  # read once: the configs below are fixed when the kernels are defined
_EPS = tl.constexpr(NORM_EPS)

#: Configs the autotuner chooses from on a GPU, by architecture: (BLOCK_M, BLOCK_N, BLOCK_D, num_warps,
#: num_stages, PAIRED, SPAN). PAIRED: the Q and D segments are walked together (their two logit tiles
#: from one load of the row tile); SPAN: column tiles of a lone segment per sweep over D in the
#: backward (a paired walk stages its two tiles). Kept: those whose every launch variant compiles
#: without register spills in bfloat16 (``tools/kernel_analysis/compile_for_gpu.py --sweep``; the
#: figures are in bench/RESULTS.md): on sm_90 the paired walk at 64 x 64; on sm_80 / sm_89 (no wgmma:
#: the dot operands live in registers) each segment alone, one tile per sweep, at 64 x 128. The prune
#: also drops what shared memory cannot hold.
GPU_TILES = {
    90: ((64, 64, 64, 8, 3, True, 2),),
    80: ((64, 128, 64, 8, 3, False, 1),),
}


def tiles_for(arch: int) -> tuple:
    """The GPU configs offered on compute capability ``arch`` (90, 80, 89, ...)."""
    return GPU_TILES[90] if arch >= 90 else GPU_TILES[80]


#: The walk of a config that does not name one (PAIRED, SPAN): the kernels' defaults.
DEFAULT_WALK = (True, 2)

#: Under the interpreter every program runs in NumPy: the smallest legal tiles, one config.
INTERPRETER_TILES = ((16, 16, 16, 4, 1, *DEFAULT_WALK),)


def _config(bm: int, bn: int, bd: int, warps: int, stages: int, paired: bool = DEFAULT_WALK[0],
            span: int = DEFAULT_WALK[1], grad: bool = True) -> triton.Config:
    kwargs = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "PAIRED": bool(paired)}
    if grad:
        kwargs["SPAN"] = span
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


def configs(grad: bool) -> list[triton.Config]:
    """The autotuner's configs for ``grad_kernel`` (``grad``) or ``lse_kernel`` (no SPAN)."""
    pinned = os.environ.get("SAMTONE_TRITON_CONFIG")
    if pinned:
        values = [int(v) for v in pinned.split(",")]
        if len(values) not in (5, 7) or (len(values) == 7 and (values[5] not in (0, 1) or values[6] not in (1, 2))):
            raise ValueError("SAMTONE_TRITON_CONFIG: expected 'BLOCK_M,BLOCK_N,BLOCK_D,num_warps,num_stages' and "
                             f"optionally ',PAIRED,SPAN' (0 or 1, 1 or 2), got {pinned!r}")
        return [_config(*values, grad=grad)]
    if INTERPRETING:
        tiles = INTERPRETER_TILES
    else:
        tiles = tuple(dict.fromkeys(t for arch in GPU_TILES for t in GPU_TILES[arch]))
    return [_config(*t, grad=grad) for t in tiles]


def shared_bytes(block_m: int, block_n: int, block_d: int, num_stages: int, itemsize: int,
                 paired: bool = DEFAULT_WALK[0], span: int = DEFAULT_WALK[1]) -> int:
    """An upper bound on a config's shared memory: the larger of the pipelined K-loop (a chunk of X
    and of one candidate tile, or two when ``paired``) and the backward's sweep over D (its staged
    coefficient tiles, two when paired or ``span`` = 2, and the pipelined chunks of their candidates),
    plus one tile for layout conversions and a few row vectors for reductions (the GPU compile check
    holds the compiled kernels to it on sm_80, sm_89 and sm_90)."""
    staged = 2 if paired or span == 2 else 1
    k_loop = num_stages * (block_m + (1 + paired) * block_n) * block_d * itemsize
    sweep = staged * (block_m * block_n + num_stages * block_n * block_d) * itemsize
    return max(k_loop, sweep) + block_m * block_n * itemsize + 4 * (block_m + block_n) * 4


@functools.cache
def _device(device_index: int) -> tuple[int | None, int | None]:
    """(compute capability as 90, 80, ..., shared memory per block) of a CUDA device."""
    if INTERPRETING or not torch.cuda.is_available():
        return None, None
    props = torch.cuda.get_device_properties(device_index)
    return 10 * props.major + props.minor, getattr(props, "shared_memory_per_block_optin", None)


def _prune(configs, named_args, **kwargs):
    """Drop tiles much larger than the problem, those the device's architecture does not get
    (``tiles_for``), and those over its shared memory."""
    args = {**named_args, **kwargs}
    n_rows, n_cols, dim = args["n_rows"], args["n_cols"], args["dim"]
    x, grad = args["X"], "BUF" in args  # grad_kernel's or lse_kernel's arguments
    arch, limit = _device(x.device.index or 0) if x.device.type == "cuda" else (None, None)
    fit = max(16, triton.next_power_of_2(dim))
    kept = []
    for c in configs:
        bm, bn, bd = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_D"]
        paired = c.kwargs.get("PAIRED", DEFAULT_WALK[0])
        span = c.kwargs.get("SPAN", DEFAULT_WALK[1]) if grad else None  # the forward has no sweep
        if bd > fit or bm > max(16, triton.next_power_of_2(n_rows)) or bn > max(16, triton.next_power_of_2(n_cols)):
            continue
        tile = (bm, bn, bd, c.num_warps, c.num_stages, paired)
        if arch is not None and tile not in [t[:6] for t in tiles_for(arch) if span in (None, t[6])]:
            continue
        if limit is not None and shared_bytes(bm, bn, bd, c.num_stages, x.element_size(), paired, span or 1) > limit:
            continue
        kept.append(c)
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.num_stages)]


def bucket(n: int) -> int:
    """Batch sizes share tuned tiles within a power of two."""
    return triton.next_power_of_2(max(int(n), 1))


_FLAGS = ["Q_ROLE", "D_ROLE", "N_ROLE", "NORMED", "PRECISION"]
_AUTOTUNE = dict(prune_configs_by={"early_config_prune": _prune})


@triton.autotune(configs=configs(grad=False), key=["rows_bucket", "cols_bucket", "dim", "n_hard", *_FLAGS],
                 **_AUTOTUNE)
@triton.jit
def lse_kernel(X, stride_x_row, stride_x_dim, X_INV_NORMS, Q, stride_q_row, stride_q_dim, Q_INV_NORMS,
               D, stride_d_row, stride_d_dim, D_INV_NORMS, NEG, stride_neg_row, stride_neg_k, stride_neg_dim,
               NEG_INV_NORMS, GROUP_IDS, SCALE, LSE, n_rows, n_cols, row_offset, dim, n_hard, rows_bucket, cols_bucket,
               hardness, Q_ROLE: tl.constexpr, D_ROLE: tl.constexpr, N_ROLE: tl.constexpr, NORMED: tl.constexpr,
               PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               PAIRED: tl.constexpr = DEFAULT_WALK[0]):
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
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if PAIRED:  # the Q and D tiles of each column tile together
        m, l = lse_walk(m, l, x, row, seg_q, seg_d, GROUP_IDS, n_cols, dim, scale, penalty, A_ROLE=Q_ROLE,
                        B_ROLE=D_ROLE, NORMED=NORMED, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
                        PRECISION=PRECISION)
    else:
        if has(Q_ROLE, ROW):
            m, l = lse_walk(m, l, x, row, seg_q, seg_q, GROUP_IDS, n_cols, dim, scale, penalty, A_ROLE=Q_ROLE,
                            B_ROLE=0, NORMED=NORMED, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
                            PRECISION=PRECISION)
        if has(D_ROLE, ROW):
            m, l = lse_walk(m, l, x, row, seg_d, seg_d, GROUP_IDS, n_cols, dim, scale, penalty, A_ROLE=D_ROLE,
                            B_ROLE=0, NORMED=NORMED, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
                            PRECISION=PRECISION)
    if has(N_ROLE, ROW):
        for k in range(0, n_hard):
            seg_n = (NEG + k * stride_neg_k, stride_neg_row, stride_neg_dim, NEG_INV_NORMS + k * n_cols, None, None)
            m, l = lse_walk(m, l, x, row, seg_n, seg_n, GROUP_IDS, n_cols, dim, scale, penalty, A_ROLE=N_ROLE,
                            B_ROLE=0, NORMED=NORMED, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
                            PRECISION=PRECISION)
    # Rows past N never reach the store, and a row with nothing kept (a document whose only
    # candidates are its group's, with d2d alone) has m = -inf: give both l = 1 so log() sees no
    # zero; the latter's log-partition is then -inf, log(0).
    tl.store(LSE + rows, m + tl.log(tl.where(row_ok & (l > 0), l, 1.0)), mask=row_ok)


@triton.autotune(configs=configs(grad=True), key=["rows_bucket", "cols_bucket", "dim", "n_hard", *_FLAGS, "FINISH"],
                 **_AUTOTUNE)
@triton.jit
def grad_kernel(OUT, stride_out_row, stride_out_block, stride_out_dim, BUF, stride_buf_row, stride_buf_block,
                stride_buf_dim, X, stride_x_row, stride_x_block, stride_x_dim, X_INV_NORMS,
                Q, stride_q_row, stride_q_dim, Q_INV_NORMS, D, stride_d_row, stride_d_dim, D_INV_NORMS,
                NEG, stride_neg_row, stride_neg_k, stride_neg_dim, NEG_INV_NORMS, GROUP_IDS, SCALE, ROW_LSE, ROW_W,
                Q_LSE, Q_W, D_LSE, D_W, POS_ROWS, stride_pos_row, stride_pos_dim, POS_COEF, FACTOR, DOTS_OUT,
                n_rows, n_cols, row_offset, col_offset, dim, n_hard, rows_bucket, cols_bucket, hardness,
                Q_ROLE: tl.constexpr, D_ROLE: tl.constexpr, N_ROLE: tl.constexpr, NORMED: tl.constexpr,
                PRECISION: tl.constexpr, FINISH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, PAIRED: tl.constexpr = DEFAULT_WALK[0], SPAN: tl.constexpr = DEFAULT_WALK[1]):
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
    dots = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # Which walk is the program's last is known here: the hard negatives' when there are any (N_ROLE
    # comes with at least one block: plan.Launch.roles), else D's, else Q's. Only that walk's last
    # step writes the gradient (FINISH); its ``final`` is a true scalar.
    true = n_cols > 0
    if PAIRED and WALK_Q and WALK_D:  # one walk, the Q and D tiles of a column tile in one sweep
        dots = grad_walk(dots, dst, x, partner, row, seg_q, seg_d, GROUP_IDS, n_cols, col_offset, dim, scale, penalty,
                         true, A_ROLE=Q_ROLE, B_ROLE=D_ROLE, FIRST=True, SPAN=1, FINISH=0 if WALK_N else FINISH,
                         NORMED=NORMED, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, PRECISION=PRECISION)
    else:  # each segment alone, SPAN column tiles per sweep
        if WALK_Q:
            dots = grad_walk(dots, dst, x, partner, row, seg_q, seg_q, GROUP_IDS, n_cols, col_offset, dim, scale,
                             penalty, true, A_ROLE=Q_ROLE, B_ROLE=0, FIRST=True, SPAN=SPAN,
                             FINISH=0 if WALK_D or WALK_N else FINISH, NORMED=NORMED, BLOCK_M=BLOCK_M,
                             BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, PRECISION=PRECISION)
        if WALK_D:
            dots = grad_walk(dots, dst, x, partner, row, seg_d, seg_d, GROUP_IDS, n_cols, col_offset, dim, scale,
                             penalty, true, A_ROLE=D_ROLE, B_ROLE=0, FIRST=not WALK_Q, SPAN=SPAN,
                             FINISH=0 if WALK_N else FINISH, NORMED=NORMED, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                             BLOCK_D=BLOCK_D, PRECISION=PRECISION)
    if WALK_N:
        for k in range(0, n_hard):
            seg_n = (NEG + k * stride_neg_k, stride_neg_row, stride_neg_dim, NEG_INV_NORMS + k * n_cols, D_LSE, D_W)
            dots = grad_walk(dots, dst, x, partner, row, seg_n, seg_n, GROUP_IDS, n_cols, col_offset, dim, scale,
                             penalty, k == n_hard - 1, A_ROLE=N_ROLE, B_ROLE=0, FIRST=False, SPAN=SPAN,
                             FINISH=FINISH, NORMED=NORMED, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
                             PRECISION=PRECISION)
    if has(FINISH, DOTS):
        tl.store(DOTS_OUT + rows * tl.num_programs(1) + blk, dots, mask=row_ok)


@triton.jit
def _gradient_chunk(BUF, stride_buf_row, stride_buf_block, stride_buf_dim, POS_ROWS, stride_pos_row, stride_pos_dim,
                    i, k, cols, m, factor, pos_coef, HAS_PARTNER: tl.constexpr):
    """Columns ``cols`` of the gradient g = factor * BUF (+ pos_coef * POS_ROWS_i for an anchor of the
    positive logit), float32 [BLOCK_R, BLOCK_D]."""
    g = tl.load(BUF + (i * stride_buf_row + k * stride_buf_block)[:, None] + cols[None, :] * stride_buf_dim, mask=m,
                other=0.0) * factor
    if HAS_PARTNER:
        partner = tl.load(POS_ROWS + (i * stride_pos_row)[:, None] + cols[None, :] * stride_pos_dim, mask=m, other=0.0)
        g += pos_coef[:, None] * partner.to(tl.float32)
    return g


@triton.jit
def epilogue_kernel(OUT, stride_out_row, stride_out_block, stride_out_dim, BUF, stride_buf_row, stride_buf_block,
                    stride_buf_dim, X, stride_x_row, stride_x_block, stride_x_dim, X_INV_NORMS, POS_ROWS,
                    stride_pos_row, stride_pos_dim, POS_INV_NORMS, POS_COEF, FACTOR, DOTS_OUT, n_rows, n_seg, dim,
                    HAS_PARTNER: tl.constexpr, NORMED: tl.constexpr, DOTS_WANTED: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT (input dtype) = the gradient of x [n_rows, n_seg, D] from its float32 buffer, g = factor * BUF
    (+ POS_COEF_i * unit(POS_ROWS_i) for an anchor of the positive logit), taken back through the
    normalisation with NORMED (OUT = r g - r^3 (g . x) x where |x| > eps, else r g); DOTS_OUT =
    <unit(x), g> per row when DOTS_WANTED. A first pass over D makes the row sums that NORMED and the
    dots need, a second writes: no temporaries. Not autotuned (it may write over BUF)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < n_rows * n_seg
    i, k = (rows // n_seg).to(tl.int64), (rows % n_seg).to(tl.int64)
    factor = tl.load(FACTOR)
    r = inv_norms(X_INV_NORMS, rows, ok, BLOCK=BLOCK_R, NORMED=NORMED)  # X_INV_NORMS [n_rows, n_seg], row-major
    pos_coef = tl.zeros((BLOCK_R,), tl.float32)  # the positive logit's coefficient times r of the partner
    if HAS_PARTNER:
        pos_coef = tl.load(POS_COEF + i, mask=ok, other=0.0) * inv_norms(POS_INV_NORMS, i, ok, BLOCK=BLOCK_R,
                                                                          NORMED=NORMED)
    offs = tl.arange(0, BLOCK_D)
    gx = tl.zeros((BLOCK_R,), tl.float32)
    xx = tl.zeros((BLOCK_R,), tl.float32)
    if NORMED or DOTS_WANTED:
        for d0 in range(0, dim, BLOCK_D):  # pass 1: g . x and |x|^2 of each row
            cols = d0 + offs
            m = ok[:, None] & (cols < dim)[None, :]
            g = _gradient_chunk(BUF, stride_buf_row, stride_buf_block, stride_buf_dim, POS_ROWS, stride_pos_row,
                                stride_pos_dim, i, k, cols, m, factor, pos_coef, HAS_PARTNER=HAS_PARTNER)
            x = tl.load(X + (i * stride_x_row + k * stride_x_block)[:, None] + cols[None, :] * stride_x_dim, mask=m,
                        other=0.0).to(tl.float32)
            gx += tl.sum(g * x, 1)
            xx += tl.sum(x * x, 1)
    if DOTS_WANTED:
        tl.store(DOTS_OUT + rows, r * gx, mask=ok)  # <unit(x), g> = r (g . x)
    # Derivation: y = r x with r = 1 / max(|x|, eps); above eps dy = r (I - y y^T) dx, so
    # dL/dx = r g - r^3 (g . x) x; at or below eps r is constant and dL/dx = r g.
    c = tl.where(tl.sqrt(xx) > _EPS, r * r * r * gx, 0.0)
    for d0 in range(0, dim, BLOCK_D):  # pass 2: write the gradient
        cols = d0 + offs
        m = ok[:, None] & (cols < dim)[None, :]
        g = _gradient_chunk(BUF, stride_buf_row, stride_buf_block, stride_buf_dim, POS_ROWS, stride_pos_row,
                            stride_pos_dim, i, k, cols, m, factor, pos_coef, HAS_PARTNER=HAS_PARTNER)
        if NORMED:
            x = tl.load(X + (i * stride_x_row + k * stride_x_block)[:, None] + cols[None, :] * stride_x_dim, mask=m,
                        other=0.0).to(tl.float32)
            g = r[:, None] * g - c[:, None] * x
        tl.store(OUT + (i * stride_out_row + k * stride_out_block)[:, None] + cols[None, :] * stride_out_dim,
                 g.to(OUT.dtype.element_ty), mask=m)


# The epilogue is memory-bound: fixed tiles, no autotuning.
EPILOGUE_ON_GPU = dict(BLOCK_R=16, BLOCK_D=128, num_warps=4)
EPILOGUE = dict(BLOCK_R=16, BLOCK_D=16) if INTERPRETING else dict(EPILOGUE_ON_GPU)
AUTOTUNED = (lse_kernel, grad_kernel)
