"""``epilogue_kernel``: a float32 gradient buffer to the gradient in the input dtype, for the grad
launches that cannot finish it themselves (NORMED: the normalisation's row sums need whole rows) and
the tensors with no walk. Memory-bound: fixed tiles, no autotuning.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._constants import NORM_EPS
from .configs import INTERPRETING
from .tiles import inv_norms

_EPS = tl.constexpr(NORM_EPS)


@triton.jit
def _gradient_chunk(
    BUF,
    stride_buf_row,
    stride_buf_block,
    stride_buf_dim,
    POS_ROWS,
    stride_pos_row,
    stride_pos_dim,
    i,
    k,
    cols,
    m,
    factor,
    pos_coef,
    HAS_PARTNER: tl.constexpr,
):
    """Columns ``cols`` of the gradient g = factor * BUF (+ pos_coef * POS_ROWS_i for an anchor of the
    positive logit), float32 [BLOCK_R, BLOCK_D]."""
    g = (
        tl.load(
            BUF + (i * stride_buf_row + k * stride_buf_block)[:, None] + cols[None, :] * stride_buf_dim,
            mask=m,
            other=0.0,
        )
        * factor
    )
    if HAS_PARTNER:
        partner = tl.load(POS_ROWS + (i * stride_pos_row)[:, None] + cols[None, :] * stride_pos_dim, mask=m, other=0.0)
        g += pos_coef[:, None] * partner.to(tl.float32)
    return g


@triton.jit
def epilogue_kernel(
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
    POS_ROWS,
    stride_pos_row,
    stride_pos_dim,
    POS_INV_NORMS,
    POS_COEF,
    FACTOR,
    DOTS_OUT,
    n_rows,
    n_seg,
    dim,
    HAS_PARTNER: tl.constexpr,
    NORMED: tl.constexpr,
    DOTS_WANTED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
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
        pos_coef = tl.load(POS_COEF + i, mask=ok, other=0.0) * inv_norms(
            POS_INV_NORMS, i, ok, BLOCK=BLOCK_R, NORMED=NORMED
        )
    offs = tl.arange(0, BLOCK_D)
    gx = tl.zeros((BLOCK_R,), tl.float32)
    xx = tl.zeros((BLOCK_R,), tl.float32)
    if NORMED or DOTS_WANTED:
        for d0 in range(0, dim, BLOCK_D):  # pass 1: g . x and |x|^2 of each row
            cols = d0 + offs
            m = ok[:, None] & (cols < dim)[None, :]
            g = _gradient_chunk(
                BUF,
                stride_buf_row,
                stride_buf_block,
                stride_buf_dim,
                POS_ROWS,
                stride_pos_row,
                stride_pos_dim,
                i,
                k,
                cols,
                m,
                factor,
                pos_coef,
                HAS_PARTNER=HAS_PARTNER,
            )
            x = tl.load(
                X + (i * stride_x_row + k * stride_x_block)[:, None] + cols[None, :] * stride_x_dim, mask=m, other=0.0
            ).to(tl.float32)
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
        g = _gradient_chunk(
            BUF,
            stride_buf_row,
            stride_buf_block,
            stride_buf_dim,
            POS_ROWS,
            stride_pos_row,
            stride_pos_dim,
            i,
            k,
            cols,
            m,
            factor,
            pos_coef,
            HAS_PARTNER=HAS_PARTNER,
        )
        if NORMED:
            x = tl.load(
                X + (i * stride_x_row + k * stride_x_block)[:, None] + cols[None, :] * stride_x_dim, mask=m, other=0.0
            ).to(tl.float32)
            g = r[:, None] * g - c[:, None] * x
        tl.store(
            OUT + (i * stride_out_row + k * stride_out_block)[:, None] + cols[None, :] * stride_out_dim,
            g.to(OUT.dtype.element_ty),
            mask=m,
        )


EPILOGUE_ON_GPU = dict(BLOCK_R=16, BLOCK_D=128, num_warps=4)
EPILOGUE = dict(BLOCK_R=16, BLOCK_D=16) if INTERPRETING else dict(EPILOGUE_ON_GPU)
