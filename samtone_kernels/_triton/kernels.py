"""The kernels and their autotuning: ``lse_kernel`` (forward), ``grad_kernel`` (backward, one launch
per tensor that owns its rows), ``epilogue_kernel`` (a float32 gradient buffer to the input dtype).

The walks a launch makes are its constexpr flags, from ``plan.Launch.flags``: ``{Q,D,N}_ROW`` (the
program's rows are anchors of that segment's block), ``{Q,D}_COL`` (the segment's rows are anchors
and the program's rows their candidates), ``{Q,D,N}_MASK`` (``plan.SELF | plan.GROUP`` bits) and
``{Q,D,N}_PEN`` (the q2d entries that take the hardness penalty, ``plan.HARDNESS``).
Segments are walked in the order Q, D, then the hard-negative blocks.

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

from .._options import NORM_EPS, interpreting
from .tiles import grad_walk, inv_norms, lse_walk

INTERPRETING = interpreting()  # read once: the configs below are fixed when the kernels are defined
_EPS = tl.constexpr(NORM_EPS)

#: Tiles the autotuner chooses from on a GPU: (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages).
#: Kept: those whose every launch variant compiles without register spills in bfloat16
#: (tests/compile_for_gpu.py, swept on sm_90, sm_80 and sm_89). 128 x 128 tiles and 4-warp tiles
#: spill; on sm_80 / sm_89 every 64 x 64 and 128 x 64 tile, and 64 x 128 with BLOCK_D = 32, spill
#: in some variant at the 255-register limit, so those devices get one tile and no tuning. Their
#: speed is not measured yet (bench/RESULTS.md); the prune also drops what shared memory cannot hold.
GPU_TILES = ((64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 64, 64, 8, 3))
HOPPER_ONLY = ((128, 64, 64, 8, 3), (64, 64, 64, 8, 3))


def tiles_for(arch: int) -> tuple:
    """The GPU tiles offered on compute capability ``arch`` (90, 80, 89, ...)."""
    return GPU_TILES if arch >= 90 else tuple(t for t in GPU_TILES if t not in HOPPER_ONLY)


#: Under the interpreter every program runs in NumPy: the smallest legal tiles, one config.
INTERPRETER_TILES = ((16, 16, 16, 4, 1),)


def _config(bm: int, bn: int, bd: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}, num_warps=warps, num_stages=stages)


def configs() -> list[triton.Config]:
    pinned = os.environ.get("SAMTONE_TRITON_CONFIG")
    if pinned:
        values = [int(v) for v in pinned.split(",")]
        if len(values) != 5:
            raise ValueError("SAMTONE_TRITON_CONFIG: expected 'BLOCK_M,BLOCK_N,BLOCK_D,num_warps,num_stages', "
                             f"got {pinned!r}")
        return [_config(*values)]
    return [_config(*t) for t in (INTERPRETER_TILES if INTERPRETING else GPU_TILES)]


def shared_bytes(block_m: int, block_n: int, block_d: int, num_stages: int, itemsize: int) -> int:
    """An upper bound on a config's shared memory: the pipelined X and Y chunks of the K-loop, the
    coefficient tile G and the pipelined Y chunks of ``G Y`` (the GPU compile check holds the
    compiled kernels to it on sm_80, sm_89 and sm_90)."""
    k_loop = num_stages * (block_m + block_n) * block_d * itemsize
    g_times_y = block_m * block_n * itemsize + num_stages * block_n * block_d * itemsize
    return k_loop + g_times_y + 4 * (block_m + block_n) * 4  # and a few row vectors for reductions


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
    x = args["X"]
    arch, limit = _device(x.device.index or 0) if x.device.type == "cuda" else (None, None)
    fit = max(16, triton.next_power_of_2(dim))
    kept = []
    for c in configs:
        bm, bn, bd = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_D"]
        if bd > fit or bm > max(16, triton.next_power_of_2(n_rows)) or bn > max(16, triton.next_power_of_2(n_cols)):
            continue
        if arch is not None and (bm, bn, bd, c.num_warps, c.num_stages) in HOPPER_ONLY and arch < 90:
            continue
        if limit is not None and shared_bytes(bm, bn, bd, c.num_stages, x.element_size()) > limit:
            continue
        kept.append(c)
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.num_stages)]


def bucket(n: int) -> int:
    """Batch sizes share tuned tiles within a power of two."""
    return triton.next_power_of_2(max(int(n), 1))


_FLAGS = ["Q_ROW", "Q_MASK", "D_ROW", "D_MASK", "D_PEN", "N_ROW", "N_MASK", "N_PEN", "NORMED", "PRECISION"]
_AUTOTUNE = dict(prune_configs_by={"early_config_prune": _prune})


@triton.autotune(configs=configs(), key=["rows_bucket", "cols_bucket", "dim", "n_hard", *_FLAGS], **_AUTOTUNE)
@triton.jit
def lse_kernel(X, sxn, sxd, RX, Q, sqn, sqd, RQ, D, sdn, sdd, RD, NEG, snn, snh, snd, RNEG, G, SCALE, LSE,
               n_rows, n_cols, row_offset, dim, n_hard, rows_bucket, cols_bucket, hardness,
               Q_ROW: tl.constexpr, Q_MASK: tl.constexpr, D_ROW: tl.constexpr, D_MASK: tl.constexpr,
               D_PEN: tl.constexpr, N_ROW: tl.constexpr, N_MASK: tl.constexpr, N_PEN: tl.constexpr,
               NORMED: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """LSE[rows] = log sum over the kept candidates of exp(scale * X[rows] . y) (plus the hardness
    penalty ``hardness * X[rows] . y`` on the entries D_PEN, N_PEN select). Anchor row i is candidate
    pair ``row_offset + i`` (the masks compare those indices); candidates Q, D [n_cols], NEG
    [n_cols, n_hard] (inverse norms RNEG [n_hard, n_cols])."""
    tl.static_assert(Q_ROW or D_ROW)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_g = rows + row_offset
    row_ok = rows < n_rows
    scale = tl.load(SCALE)
    hard = hardness / scale
    rx = inv_norms(RX, rows, row_ok, BLOCK_M, NORMED)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if Q_ROW:
        m, l = lse_walk(m, l, X, sxn, sxd, rx, rows, rows_g, row_ok, Q, sqn, sqd, RQ, G, n_cols, dim, scale, hard,
                        Q_MASK, 0, NORMED, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    if D_ROW:
        m, l = lse_walk(m, l, X, sxn, sxd, rx, rows, rows_g, row_ok, D, sdn, sdd, RD, G, n_cols, dim, scale, hard,
                        D_MASK, D_PEN, NORMED, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    if N_ROW:
        for k in range(0, n_hard):
            m, l = lse_walk(m, l, X, sxn, sxd, rx, rows, rows_g, row_ok, NEG + k * snh, snn, snd,
                            RNEG + k * n_cols, G, n_cols, dim, scale, hard, N_MASK, N_PEN, NORMED,
                            BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    # Rows past N never reach the store, and a row with nothing kept (a document whose only
    # candidates are its group's, with d2d alone) has m = -inf: give both l = 1 so log() sees no
    # zero; the latter's log-partition is then -inf, log(0).
    tl.store(LSE + rows, m + tl.log(tl.where(row_ok & (l > 0), l, 1.0)), mask=row_ok)


@triton.autotune(configs=configs(), key=["rows_bucket", "cols_bucket", "dim", "n_hard", "Q_COL", "Q_PEN", "D_COL",
                                          *_FLAGS], **_AUTOTUNE)
@triton.jit
def grad_kernel(OUT, son, sok, sod, X, sxn, sxk, sxd, RX, Q, sqn, sqd, RQ, D, sdn, sdd, RD, NEG, snn, snh, snd,
                RNEG, G, SCALE, LSE_R, W_R, LSE_Q, W_Q, LSE_D, W_D,
                n_rows, n_cols, row_offset, col_offset, dim, n_hard, rows_bucket, cols_bucket, hardness,
                Q_ROW: tl.constexpr, Q_COL: tl.constexpr, Q_MASK: tl.constexpr, Q_PEN: tl.constexpr,
                D_ROW: tl.constexpr, D_COL: tl.constexpr, D_MASK: tl.constexpr, D_PEN: tl.constexpr,
                N_ROW: tl.constexpr, N_MASK: tl.constexpr, N_PEN: tl.constexpr,
                NORMED: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT[rows] = sum over the walked segments of G Y (float32, unscaled; see ``tiles.grad_walk``).

    X [n_rows, K, D] (axis 1 of the grid walks the K row blocks of hard negatives; K = 1 otherwise,
    inverse norms RX [K, n_rows]); OUT is shaped like X. Row statistics LSE_R, W_R (local row index)
    serve the row blocks, LSE_Q, W_Q and LSE_D, W_D the column blocks of the Q and D segments.
    Column j of Q and D is pair ``col_offset + j``; row i is pair ``row_offset + i``. ``{Q,D,N}_PEN``:
    the q2d entries whose softmax took the hardness penalty (column role on Q, row role on D, N).
    """
    tl.static_assert(Q_ROW or Q_COL or D_ROW or D_COL)  # so the hard negatives' walk is never the first
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_g = rows + row_offset
    row_ok = rows < n_rows
    blk = tl.program_id(1).to(tl.int64)
    X = X + blk * sxk
    OUT = OUT + blk * sok
    scale = tl.load(SCALE)
    hard = hardness / scale
    rx = inv_norms(RX + blk * n_rows, rows, row_ok, BLOCK_M, NORMED)
    lse_r = tl.zeros((BLOCK_M,), dtype=tl.float32)
    w_r = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if Q_ROW or D_ROW or N_ROW:
        lse_r = tl.load(LSE_R + rows, mask=row_ok, other=0.0)
        w_r = tl.load(W_R + rows, mask=row_ok, other=0.0)
    if Q_ROW or Q_COL:
        grad_walk(OUT, son, sod, X, sxn, sxd, rx, rows, rows_g, row_ok, lse_r, w_r, Q, sqn, sqd, RQ, LSE_Q, W_Q,
                  G, n_cols, col_offset, dim, scale, hard, True, Q_ROW, Q_COL, Q_MASK, Q_PEN, True, NORMED,
                  BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    if D_ROW or D_COL:
        grad_walk(OUT, son, sod, X, sxn, sxd, rx, rows, rows_g, row_ok, lse_r, w_r, D, sdn, sdd, RD, LSE_D, W_D,
                  G, n_cols, col_offset, dim, scale, hard, not (Q_ROW or Q_COL), D_ROW, D_COL, D_MASK, D_PEN, False,
                  NORMED, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    if N_ROW:
        for k in range(0, n_hard):
            grad_walk(OUT, son, sod, X, sxn, sxd, rx, rows, rows_g, row_ok, lse_r, w_r, NEG + k * snh, snn, snd,
                      RNEG + k * n_cols, LSE_D, W_D, G, n_cols, col_offset, dim, scale, hard, False, True, False,
                      N_MASK, N_PEN, False, NORMED, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)


@triton.jit
def _gradient_chunk(BUF, sbn, sbk, sbd, P, spn, spd, i, k, cols, m, factor, pos_r, HAS_PARTNER: tl.constexpr):
    """Columns ``cols`` of the gradient g = factor * BUF (+ pos_r * P_i for an anchor of the positive
    logit), float32 [BLOCK_R, BLOCK_D]."""
    g = tl.load(BUF + (i * sbn + k * sbk)[:, None] + cols[None, :] * sbd, mask=m, other=0.0) * factor
    if HAS_PARTNER:
        g += pos_r[:, None] * tl.load(P + (i * spn)[:, None] + cols[None, :] * spd, mask=m, other=0.0).to(tl.float32)
    return g


@triton.jit
def epilogue_kernel(OUT, son, sok, sod, BUF, sbn, sbk, sbd, X, sxn, sxk, sxd, RX, P, spn, spd, RP, POS, FACTOR,
                    DOTS, n_rows, n_seg, dim, HAS_PARTNER: tl.constexpr, NORMED: tl.constexpr,
                    DOTS_WANTED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT (input dtype) = the gradient of x [n_rows, n_seg, D] from its float32 buffer, g = factor * BUF
    (+ POS_i * unit(P_i) for an anchor of the positive logit), taken back through the normalisation
    with NORMED (OUT = r g - r^3 (g . x) x where |x| > eps, else r g); DOTS = <unit(x), g> per row
    when DOTS_WANTED. A first pass over D makes the row sums that NORMED and DOTS need, a second
    writes: no temporaries. Not autotuned (it may write over BUF)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < n_rows * n_seg
    i, k = (rows // n_seg).to(tl.int64), (rows % n_seg).to(tl.int64)
    factor = tl.load(FACTOR)
    r = inv_norms(RX, rows, ok, BLOCK_R, NORMED)  # RX [n_rows, n_seg], row-major
    pos_r = tl.zeros((BLOCK_R,), tl.float32)  # the positive logit's coefficient times r of the partner
    if HAS_PARTNER:
        pos_r = tl.load(POS + i, mask=ok, other=0.0) * inv_norms(RP, i, ok, BLOCK_R, NORMED)
    offs = tl.arange(0, BLOCK_D)
    gx = tl.zeros((BLOCK_R,), tl.float32)
    xx = tl.zeros((BLOCK_R,), tl.float32)
    if NORMED or DOTS_WANTED:
        for d0 in range(0, dim, BLOCK_D):  # pass 1: g . x and |x|^2 of each row
            cols = d0 + offs
            m = ok[:, None] & (cols < dim)[None, :]
            g = _gradient_chunk(BUF, sbn, sbk, sbd, P, spn, spd, i, k, cols, m, factor, pos_r, HAS_PARTNER)
            x = tl.load(X + (i * sxn + k * sxk)[:, None] + cols[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
            gx += tl.sum(g * x, 1)
            xx += tl.sum(x * x, 1)
    if DOTS_WANTED:
        tl.store(DOTS + rows, r * gx, mask=ok)  # <unit(x), g> = r (g . x)
    # Derivation: y = r x with r = 1 / max(|x|, eps); above eps dy = r (I - y y^T) dx, so
    # dL/dx = r g - r^3 (g . x) x; at or below eps r is constant and dL/dx = r g.
    c = tl.where(tl.sqrt(xx) > _EPS, r * r * r * gx, 0.0)
    for d0 in range(0, dim, BLOCK_D):  # pass 2: write the gradient
        cols = d0 + offs
        m = ok[:, None] & (cols < dim)[None, :]
        g = _gradient_chunk(BUF, sbn, sbk, sbd, P, spn, spd, i, k, cols, m, factor, pos_r, HAS_PARTNER)
        if NORMED:
            x = tl.load(X + (i * sxn + k * sxk)[:, None] + cols[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
            g = r[:, None] * g - c[:, None] * x
        tl.store(OUT + (i * son + k * sok)[:, None] + cols[None, :] * sod, g.to(OUT.dtype.element_ty), mask=m)


# The epilogue is memory-bound: fixed tiles, no autotuning.
EPILOGUE_ON_GPU = dict(BLOCK_R=16, BLOCK_D=128, num_warps=4)
EPILOGUE = dict(BLOCK_R=16, BLOCK_D=16) if INTERPRETING else dict(EPILOGUE_ON_GPU)
AUTOTUNED = (lse_kernel, grad_kernel)
