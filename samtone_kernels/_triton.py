"""Fused Triton kernels: per-anchor log-partitions of the SamToNe logit blocks, forward and backward,
in O(N * D) memory (no N x M buffer of any kind).

Layers, bottom to top:

1. ``@triton.jit`` helpers: one logit tile (a K-loop over D chunks), its keep-mask, and the three
   per-segment loops (online log-sum-exp; anchor-side gradient; candidate-side gradient). With
   ``normalize=True`` (NORMED) the kernels read the raw embeddings and scale each logit tile by its
   rows' inverse norms (and each probability tile by the other side's before its gradient dot): the
   logits of the unit vectors, with no normalised copy and nothing added inside the K-loop.
2. Kernels: ``_lse_fwd_kernel`` (one program per block of anchor rows), ``_anchor_grad_kernel`` (per
   block of anchor rows), ``_candidate_grad_kernel`` (per block of candidate rows) and
   ``_epilogue_kernel`` (turns a float32 gradient buffer into the gradient in the input dtype).
3. Launchers and two ``torch.library.custom_op``s (forward, backward) with fake implementations and
   an autograd formula, so ``torch.compile`` traces around them. The forward op also returns the
   positive logits ``p_i = scale * q_i . d_i``, so that their gradient lands in the same buffers.

Candidates come in *segments* of N rows: the queries, the positive documents, and each block
``hard_negatives[:, k]``. An anchor kind walks the segments of its partition:

=============  ====================================  ================================================
anchor         segment (direction)                   entries removed for anchor i (constexpr flags)
=============  ====================================  ================================================
query q_i      queries (q2q, if selected)            q_i itself (EXCL_SELF), its group (GROUP)
query q_i      documents (q2d)                       its group's positives (GROUP)
query q_i      hard-negative block k (q2d)           none
document d_i   queries (d2q)                         its group's queries (GROUP)
document d_i   documents (d2d, if selected)          d_i (EXCL_SELF), its group's positives (GROUP)
document d_i   hard-negative block k (d2d)           n[i, k] (EXCL_SELF)
=============  ====================================  ================================================

Gradient (derivation). The kernels compute F = sum_{a,i} w_{a,i} lse_{a,i}, where w = dL/dlse is the
upstream gradient and lse_{a,i} = log sum_{x kept} exp(s_x), s_x = scale * (x_anchor . y_x). Then

    dF/ds_x = w_{a,i} * P_x,        P_x = exp(s_x - lse_{a,i})    (0 where masked)
    dF/dx_anchor = scale * sum_x (w P)_x y_x                        (``_anchor_grad_kernel``)
    dF/dy_x      = scale * sum_{a,i} (w P)_{a,i,x} x_{a,i}          (``_candidate_grad_kernel``)

A query takes part as an anchor (q2d, q2q) *and* as a candidate (q2q, d2q); a document as an anchor
(d2q, d2d) *and* as a candidate (q2d, d2d): its gradient is the sum of both kernels' outputs. When the
candidates are the anchors themselves (no gathered batch) both kernels accumulate into one float32
buffer per tensor. The positive logits add w_p,i * scale * d_i to dF/dq_i and w_p,i * scale * q_i to
dF/dd_i. For the temperature, F is homogeneous: F(c X, scale) = F(X, c^2 scale) for every embedding
X (the positive logits included), so d/dc at c = 1 gives  sum_X <X, dF/dX> = 2 scale dF/dscale : the
scale's gradient costs one dot product of the embedding gradients, no kernel work.

Normalisation (NORMED): with y = r x, r = 1 / max(|x|, eps), the kernels give dF/dy; the epilogue
kernel takes it back to x, dF/dx = r g - r^3 (g . x) x (r g at or below eps).

Memory: the backward allocates one float32 buffer at a time, which the epilogue turns into the
gradient in the input's dtype (in place for float32) before the next; the saved tensors are the
inputs and O(N) statistics.

Determinism: every output element is owned by one program, which accumulates it in a fixed order
(read-modify-write of a float32 buffer, no atomics; the candidate kernel runs after the anchor kernel
when they share a buffer); the first tile stores instead of adding, so the buffers need no zeroing
(and tests poison them with NaN).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._options import NORM_EPS, LossOptions
from ._rows import inverse_norms, row_chunks

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_EPS = tl.constexpr(NORM_EPS)

# Set by tests: fill every buffer the kernels must write with NaN before launching them.
POISON_OUTPUTS = False


# --------------------------------------------------------------------------------------------------
# 1. jit helpers
# --------------------------------------------------------------------------------------------------
@triton.jit
def _inv_norms(R, idx, ok, BLOCK: tl.constexpr, NORMED: tl.constexpr):
    """Inverse norms [BLOCK] of rows ``idx`` (ones without NORMED; R is then never read)."""
    r = tl.full((BLOCK,), 1.0, dtype=tl.float32)
    if NORMED:
        r = tl.load(R + idx, mask=ok, other=1.0)
    return r


@triton.jit
def _scores(X, sxn, sxd, rx, rows, row_ok, Y, syn, syd, ry, cols, col_ok, dim, scale, NORMED: tl.constexpr,
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
def _keep(rows_g, row_ok, cols, col_ok, G, EXCL_SELF: tl.constexpr, GROUP: tl.constexpr):
    """Keep-mask [BLOCK_M, BLOCK_N] of a tile: in range, minus self (EXCL_SELF) and group-mates (GROUP).
    ``rows_g`` are the anchors' indices among the candidates (their local index plus the row offset)."""
    keep = row_ok[:, None] & col_ok[None, :]
    same = rows_g[:, None] == cols[None, :]
    if EXCL_SELF:
        keep = keep & ~same
    if GROUP:
        g_rows = tl.load(G + rows_g, mask=row_ok, other=0)
        g_cols = tl.load(G + cols, mask=col_ok, other=0)
        keep = keep & ~((g_rows[:, None] == g_cols[None, :]) & ~same)
    return keep


@triton.jit
def _lse_segment(m, l, X, sxn, sxd, rx, rows, rows_g, row_ok, Y, syn, syd, RY, G, n_cand, dim, scale,
                 EXCL_SELF: tl.constexpr, GROUP: tl.constexpr, NORMED: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Fold one candidate segment into the running (max m, sum l) of each anchor row."""
    for c0 in range(0, n_cand, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cand
        ry = _inv_norms(RY, cols, col_ok, BLOCK_N, NORMED)
        s = _scores(X, sxn, sxd, rx, rows, row_ok, Y, syn, syd, ry, cols, col_ok, dim, scale, NORMED,
                    BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        s = tl.where(_keep(rows_g, row_ok, cols, col_ok, G, EXCL_SELF, GROUP), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        # A row with nothing kept so far keeps m = -inf; shift by 0 so exp(-inf - 0) = 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m = m_new
    return m, l


@triton.jit
def _anchor_grad_segment(DX, sdxn, sdxd, X, sxn, sxd, rx, rows, rows_g, row_ok, lse, coef, Y, syn, syd, RY,
                         G, n_cand, dim, scale, FIRST: tl.constexpr, EXCL_SELF: tl.constexpr,
                         GROUP: tl.constexpr, NORMED: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """DX[rows] (+)= sum over this segment's columns of (w P) y, in float32 (scale applied later)."""
    offs_k = tl.arange(0, BLOCK_D)
    dx_rows = DX + rows.to(tl.int64)[:, None] * sdxn
    for c0 in range(0, n_cand, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cand
        ry = _inv_norms(RY, cols, col_ok, BLOCK_N, NORMED)
        s = _scores(X, sxn, sxd, rx, rows, row_ok, Y, syn, syd, ry, cols, col_ok, dim, scale, NORMED,
                    BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        keep = _keep(rows_g, row_ok, cols, col_ok, G, EXCL_SELF, GROUP)
        wp = tl.exp(tl.where(keep, s - lse[:, None], float("-inf"))) * coef[:, None]
        if NORMED:
            wp = wp * ry[None, :]  # sum_j (w P)_j r_j y_j = sum_j (w P)_j (unit y_j), with raw y below
        if FIRST:
            started = c0 > 0
        else:
            started = c0 >= 0
        y_rows = Y + cols.to(tl.int64)[:, None] * syn
        for k0 in range(0, dim, BLOCK_D):
            ks = k0 + offs_k
            k_ok = ks[None, :] < dim
            y = tl.load(y_rows + ks[None, :] * syd, mask=col_ok[:, None] & k_ok, other=0.0)
            upd = tl.dot(wp.to(y.dtype), y, input_precision=PRECISION)
            ptrs = dx_rows + ks[None, :] * sdxd
            out_ok = row_ok[:, None] & k_ok
            upd += tl.load(ptrs, mask=out_ok & started, other=0.0)
            tl.store(ptrs, upd, mask=out_ok)


@triton.jit
def _candidate_grad_segment(DY, sdyn, sdyd, Y, syn, syd, ry, cols, col_ok, X, sxn, sxd, RX, LSE, COEF, G,
                            n_anchor, row_offset, dim, scale, FIRST: tl.constexpr, EXCL_SELF: tl.constexpr,
                            GROUP: tl.constexpr, NORMED: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """DY[cols] (+)= sum over one anchor kind's rows of (w P)^T x, in float32 (scale applied later)."""
    offs_k = tl.arange(0, BLOCK_D)
    dy_rows = DY + cols.to(tl.int64)[:, None] * sdyn
    for r0 in range(0, n_anchor, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n_anchor
        rx = _inv_norms(RX, rows, row_ok, BLOCK_M, NORMED)
        s = _scores(X, sxn, sxd, rx, rows, row_ok, Y, syn, syd, ry, cols, col_ok, dim, scale, NORMED,
                    BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        keep = _keep(rows + row_offset, row_ok, cols, col_ok, G, EXCL_SELF, GROUP)
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
        coef = tl.load(COEF + rows, mask=row_ok, other=0.0)
        wp = tl.exp(tl.where(keep, s - lse[:, None], float("-inf"))) * coef[:, None]
        if NORMED:
            wp = wp * rx[:, None]  # the anchors' unit vectors, with raw x below
        wp_t = tl.trans(wp)
        if FIRST:
            started = r0 > 0
        else:
            started = r0 >= 0
        x_rows = X + rows.to(tl.int64)[:, None] * sxn
        for k0 in range(0, dim, BLOCK_D):
            ks = k0 + offs_k
            k_ok = ks[None, :] < dim
            x = tl.load(x_rows + ks[None, :] * sxd, mask=row_ok[:, None] & k_ok, other=0.0)
            upd = tl.dot(wp_t.to(x.dtype), x, input_precision=PRECISION)
            ptrs = dy_rows + ks[None, :] * sdyd
            out_ok = col_ok[:, None] & k_ok
            upd += tl.load(ptrs, mask=out_ok & started, other=0.0)
            tl.store(ptrs, upd, mask=out_ok)


# --------------------------------------------------------------------------------------------------
# 2. Kernels
# --------------------------------------------------------------------------------------------------
def _configs():
    if INTERPRETING:  # the interpreter runs every program in NumPy: smallest legal tiles, no tuning
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=s)
        for bm in (64, 128) for bn in (64, 128) for bd in (32, 64) for w in (4, 8) for s in (2, 3)
        if not (bm == 128 and bn == 128 and w == 4)
    ]


def _prune(configs, named_args, **kwargs):
    """Drop tiles much larger than the problem (small N or D), keeping at least one config."""
    n_pairs, dim = min(named_args["n_anchor"], named_args["n_cand"]), named_args["dim"]
    kept = [c for c in configs
            if c.kwargs["BLOCK_D"] <= max(16, triton.next_power_of_2(dim))
            and min(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= max(16, triton.next_power_of_2(n_pairs))]
    return kept or configs[:1]


_AUTOTUNE = dict(configs=_configs(), key=["n_anchor", "n_cand", "dim", "n_hard"],
                 prune_configs_by={"early_config_prune": _prune})


@triton.autotune(**_AUTOTUNE)
@triton.jit
def _lse_fwd_kernel(X, sxn, sxd, RX, Q, sqn, sqd, RQ, D, sdn, sdd, RD, NEG, snn, snh, snd, RNEG, G, SCALE, LSE,
                    n_anchor, n_cand, row_offset, dim, n_hard,
                    USE_Q: tl.constexpr, Q_EXCL: tl.constexpr, USE_C: tl.constexpr, C_EXCL: tl.constexpr,
                    HAS_GROUPS: tl.constexpr, NORMED: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """LSE[rows] = log sum over the kept candidates of exp(scale * X[rows] . y). Anchor row i is
    candidate pair ``row_offset + i`` (the self and group masks compare those indices)."""
    tl.static_assert(USE_Q or USE_C)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_g = rows + row_offset
    row_ok = rows < n_anchor
    scale = tl.load(SCALE)
    rx = _inv_norms(RX, rows, row_ok, BLOCK_M, NORMED)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if USE_Q:
        m, l = _lse_segment(m, l, X, sxn, sxd, rx, rows, rows_g, row_ok, Q, sqn, sqd, RQ, G, n_cand, dim,
                            scale, Q_EXCL, HAS_GROUPS, NORMED, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    if USE_C:
        m, l = _lse_segment(m, l, X, sxn, sxd, rx, rows, rows_g, row_ok, D, sdn, sdd, RD, G, n_cand, dim,
                            scale, C_EXCL, HAS_GROUPS, NORMED, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        for k in range(0, n_hard):  # hard negatives: never masked by groups
            m, l = _lse_segment(m, l, X, sxn, sxd, rx, rows, rows_g, row_ok, NEG + k * snh, snn, snd,
                                RNEG + k * n_cand, G, n_cand, dim, scale, C_EXCL, False, NORMED,
                                BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    # Rows past N never reach the store; give them l = 1 so log() sees no zero.
    tl.store(LSE + rows, m + tl.log(tl.where(row_ok, l, 1.0)), mask=row_ok)


@triton.autotune(**_AUTOTUNE)
@triton.jit
def _anchor_grad_kernel(DX, sdxn, sdxd, X, sxn, sxd, RX, Q, sqn, sqd, RQ, D, sdn, sdd, RD,
                        NEG, snn, snh, snd, RNEG, G, SCALE, LSE, COEF, n_anchor, n_cand, row_offset, dim, n_hard,
                        USE_Q: tl.constexpr, Q_EXCL: tl.constexpr, USE_C: tl.constexpr,
                        C_EXCL: tl.constexpr, HAS_GROUPS: tl.constexpr, NORMED: tl.constexpr,
                        PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """DX[rows] = sum over the anchor's kept candidates of (w P) y (unscaled; see the module doc)."""
    tl.static_assert(USE_Q or USE_C)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_g = rows + row_offset
    row_ok = rows < n_anchor
    scale = tl.load(SCALE)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    coef = tl.load(COEF + rows, mask=row_ok, other=0.0)
    rx = _inv_norms(RX, rows, row_ok, BLOCK_M, NORMED)
    if USE_Q:
        _anchor_grad_segment(DX, sdxn, sdxd, X, sxn, sxd, rx, rows, rows_g, row_ok, lse, coef, Q, sqn, sqd,
                             RQ, G, n_cand, dim, scale, True, Q_EXCL, HAS_GROUPS, NORMED,
                             BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    if USE_C:
        _anchor_grad_segment(DX, sdxn, sdxd, X, sxn, sxd, rx, rows, rows_g, row_ok, lse, coef, D, sdn, sdd,
                             RD, G, n_cand, dim, scale, not USE_Q, C_EXCL, HAS_GROUPS, NORMED,
                             BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        for k in range(0, n_hard):
            _anchor_grad_segment(DX, sdxn, sdxd, X, sxn, sxd, rx, rows, rows_g, row_ok, lse, coef,
                                 NEG + k * snh, snn, snd, RNEG + k * n_cand, G, n_cand, dim, scale, False,
                                 C_EXCL, False, NORMED, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)


@triton.autotune(**_AUTOTUNE)
@triton.jit
def _candidate_grad_kernel(DY, sdyn, sdyd, sdyk, Y, syn, syd, syk, RY, Q, sqn, sqd, RQ, D, sdn, sdd, RD,
                           G, SCALE, LSE_Q, COEF_Q, LSE_D, COEF_D, n_anchor, n_cand, row_offset, dim, n_hard,
                           USE_QA: tl.constexpr, QA_EXCL: tl.constexpr, USE_DA: tl.constexpr,
                           DA_EXCL: tl.constexpr, GROUP: tl.constexpr, ACCUMULATE: tl.constexpr,
                           NORMED: tl.constexpr, PRECISION: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """DY[cols] (+)= sum over the query anchors and document anchors that see these candidates of
    (w P)^T x (unscaled): stored, or added to DY's contents with ACCUMULATE (the anchor-side
    gradient of the same tensor, written by ``_anchor_grad_kernel`` before this launch). Axis 1 of
    the grid walks the segments of a [N, K, D] candidate tensor (inverse norms RY [K, N])."""
    tl.static_assert(USE_QA or USE_DA)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cand
    seg = tl.program_id(1).to(tl.int64)
    Y = Y + seg * syk
    DY = DY + seg * sdyk
    scale = tl.load(SCALE)
    ry = _inv_norms(RY + seg * n_cand, cols, col_ok, BLOCK_N, NORMED)
    if USE_QA:
        _candidate_grad_segment(DY, sdyn, sdyd, Y, syn, syd, ry, cols, col_ok, Q, sqn, sqd, RQ, LSE_Q, COEF_Q,
                                G, n_anchor, row_offset, dim, scale, not ACCUMULATE, QA_EXCL, GROUP, NORMED,
                                BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    if USE_DA:
        _candidate_grad_segment(DY, sdyn, sdyd, Y, syn, syd, ry, cols, col_ok, D, sdn, sdd, RD, LSE_D, COEF_D,
                                G, n_anchor, row_offset, dim, scale, not (USE_QA or ACCUMULATE), DA_EXCL, GROUP,
                                NORMED, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)


@triton.jit
def _epilogue_kernel(OUT, son, sok, sod, BUF, sbn, sbk, sbd, X, sxn, sxk, sxd, RX, P, spn, spd, RP, POS, FACTOR,
                     DOTS, n_rows, n_seg, dim, HAS_PARTNER: tl.constexpr, NORMED: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT (input dtype) = the gradient of x [n_rows, n_seg, D] from its float32 buffer, g = factor * BUF
    (+ POS_i * unit(P_i) for an anchor of the positive logit), taken back through the normalisation
    with NORMED (OUT = r g - r^3 (g . x) x where |x| > eps, else r g); DOTS = <unit(x), g> per row.
    Two passes over D per block of rows (one for the row sums, one to write): no temporaries."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < n_rows * n_seg
    i, k = (rows // n_seg).to(tl.int64), (rows % n_seg).to(tl.int64)
    factor = tl.load(FACTOR)
    r = _inv_norms(RX, rows, ok, BLOCK_R, NORMED)  # RX [n_rows, n_seg], row-major
    pos_r = tl.zeros((BLOCK_R,), tl.float32)  # the positive logit's coefficient times r of the partner
    if HAS_PARTNER:
        pos_r = tl.load(POS + i, mask=ok, other=0.0) * _inv_norms(RP, i, ok, BLOCK_R, NORMED)
    offs = tl.arange(0, BLOCK_D)
    gx = tl.zeros((BLOCK_R,), tl.float32)
    xx = tl.zeros((BLOCK_R,), tl.float32)
    for d0 in range(0, dim, BLOCK_D):  # pass 1: g . x and |x|^2 of each row
        cols = d0 + offs
        m = ok[:, None] & (cols < dim)[None, :]
        g = tl.load(BUF + (i * sbn + k * sbk)[:, None] + cols[None, :] * sbd, mask=m, other=0.0) * factor
        if HAS_PARTNER:
            p = tl.load(P + (i * spn)[:, None] + cols[None, :] * spd, mask=m, other=0.0).to(tl.float32)
            g += pos_r[:, None] * p
        x = tl.load(X + (i * sxn + k * sxk)[:, None] + cols[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
        gx += tl.sum(g * x, 1)
        xx += tl.sum(x * x, 1)
    tl.store(DOTS + rows, r * gx, mask=ok)  # <unit(x), g> = r (g . x)
    # Derivation: y = r x with r = 1 / max(|x|, eps); above eps dy = r (I - y y^T) dx, so
    # dL/dx = r g - r^3 (g . x) x; at or below eps r is constant and dL/dx = r g.
    c = tl.where(tl.sqrt(xx) > _EPS, r * r * r * gx, 0.0)
    for d0 in range(0, dim, BLOCK_D):  # pass 2: write the gradient
        cols = d0 + offs
        m = ok[:, None] & (cols < dim)[None, :]
        g = tl.load(BUF + (i * sbn + k * sbk)[:, None] + cols[None, :] * sbd, mask=m, other=0.0) * factor
        if HAS_PARTNER:
            p = tl.load(P + (i * spn)[:, None] + cols[None, :] * spd, mask=m, other=0.0).to(tl.float32)
            g += pos_r[:, None] * p
        if NORMED:
            x = tl.load(X + (i * sxn + k * sxk)[:, None] + cols[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
            g = r[:, None] * g - c[:, None] * x
        tl.store(OUT + (i * son + k * sok)[:, None] + cols[None, :] * sod, g.to(OUT.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------------------------------
# 3. Launchers and custom ops
# --------------------------------------------------------------------------------------------------
# The epilogue is memory-bound: fixed tiles, no autotuning.
EPILOGUE = dict(BLOCK_R=16, BLOCK_D=16) if INTERPRETING else dict(BLOCK_R=16, BLOCK_D=128, num_warps=4)


def _precision(dtype: torch.dtype) -> str:
    """float32 dots follow torch's matmul setting (TF32 only if the user allowed it)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # ignored by tl.dot for 16-bit inputs


def _empty(shape, like: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=like.device)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


class _Norms:
    """Inverse norms (float32) of every embedding tensor when the kernels normalise (NORMED: logit and
    probability tiles scaled by them), else a float32 placeholder pointer that they never read.

    ``q, d`` [n], ``q_all, d_all`` [N] and ``n_all`` [N, H] (row-major as the embeddings, for the
    epilogue); ``n_all_t`` [H, N] is what the other kernels index (segment k at k * N).
    """

    def __init__(self, normalize, placeholder, q, d, q_all, d_all, n_all, shared):
        self.on = normalize
        if not normalize:
            self.q = self.d = self.q_all = self.d_all = self.n_all = self.n_all_t = placeholder
            return
        self.q, self.d = inverse_norms(q), inverse_norms(d)
        self.q_all, self.d_all = (self.q, self.d) if shared else (inverse_norms(q_all), inverse_norms(d_all))
        self.n_all = None if n_all is None else inverse_norms(n_all)
        self.n_all_t = placeholder if n_all is None else self.n_all.t().contiguous()

    def unit(self, x, r, c):
        """Rows c of x as the kernels see them, in float32: the unit vectors (x itself unnormalised)."""
        return x[c].float() * r[c].unsqueeze(-1) if self.on else x[c].float()


def _segments(q, d, n, norms):
    """Kernel arguments of the candidate segments, each (pointer, strides, inverse norms), and n_hard."""
    neg = d.unsqueeze(1) if n is None else n  # a valid pointer when there are no hard negatives
    return (q, q.stride(0), q.stride(1), norms.q_all, d, d.stride(0), d.stride(1), norms.d_all,
            neg, neg.stride(0), neg.stride(1), neg.stride(2), norms.n_all_t), (0 if n is None else n.shape[1])


def _anchor_flags(doc_anchor: bool, q2q: bool, d2d: bool) -> dict:
    """Which segments an anchor kind walks, and whether each drops the anchor's own row."""
    if doc_anchor:  # d2q over the queries, d2d over the document columns minus pair i's own
        return dict(USE_Q=True, Q_EXCL=False, USE_C=d2d, C_EXCL=True)
    return dict(USE_Q=q2q, Q_EXCL=True, USE_C=True, C_EXCL=False)  # q2q minus q_i; q2d


def _grid_rows(n_pairs):
    return lambda meta: (triton.cdiv(n_pairs, meta["BLOCK_M"]),)


def _groups_arg(groups, q):
    return (groups.contiguous(), True) if groups is not None else (q, False)


@torch.library.custom_op("samtone_kernels::row_lse", mutates_args=())
def row_lse_op(q: torch.Tensor, d: torch.Tensor, q_all: torch.Tensor | None, d_all: torch.Tensor | None,
               n_all: torch.Tensor | None, groups: torch.Tensor | None, scale: torch.Tensor, offset: int,
               q2q: bool, d2q: bool, d2d: bool, normalize: bool) -> torch.Tensor:
    """[A + 1, n] float32 row statistics of the anchors q, d [n, D], which are pairs
    ``offset .. offset + n - 1`` of the candidates q_all, d_all [N, D], n_all [N, H, D]: log Zq (row
    0), with d2q log Zd (row 1), and last the positive logits ``scale * q_i . d_i``.
    ``q_all = d_all = None``: the candidates are the anchors themselves (no gathered batch).
    ``normalize``: every embedding is used as its unit vector (the kernels scale logit tiles)."""
    shared = q_all is None
    q_all, d_all = (q, d) if shared else (q_all, d_all)
    (n_anchor, dim), n_cand = q.shape, q_all.shape[0]
    norms = _Norms(normalize, scale, q, d, q_all, d_all, n_all, shared)
    seg_args, n_hard = _segments(q_all, d_all, n_all, norms)
    g, has_groups = _groups_arg(groups, q)
    n_rows = 2 if d2q else 1
    stats = _empty((n_rows + 1, n_anchor), q)
    for a, (x, rx) in enumerate([(q, norms.q), (d, norms.d)] if d2q else [(q, norms.q)]):
        _lse_fwd_kernel[_grid_rows(n_anchor)](
            x, x.stride(0), x.stride(1), rx, *seg_args, g, scale, stats[a], n_anchor, n_cand, offset, dim,
            n_hard, **_anchor_flags(a == 1, q2q, d2d), HAS_GROUPS=has_groups, NORMED=normalize,
            PRECISION=_precision(q.dtype),
        )
    for c in row_chunks(q):  # float32 products in bounded chunks (no float32 copy of q or d)
        stats[n_rows, c] = (norms.unit(q, norms.q, c) * norms.unit(d, norms.d, c)).sum(-1) * scale
    return stats


@row_lse_op.register_fake
def _(q, d, q_all, d_all, n_all, groups, scale, offset, q2q, d2q, d2d, normalize):
    return q.new_empty((3 if d2q else 2, q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("samtone_kernels::row_lse_backward", mutates_args=())
def row_lse_backward_op(grad_stats: torch.Tensor, stats: torch.Tensor, q: torch.Tensor, d: torch.Tensor,
                        q_all: torch.Tensor | None, d_all: torch.Tensor | None, n_all: torch.Tensor | None,
                        groups: torch.Tensor | None, scale: torch.Tensor, offset: int, q2q: bool, d2q: bool,
                        d2d: bool, normalize: bool, want_dots: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor]:
    """Gradients of F = sum(grad_stats * stats), each in its input's dtype, and ``sum_X <X, dF/dX>``.

    Returns ``(dq, dd, dq_all, dd_all, dn_all, dots)``: dq, dd [n, D] the anchor side (plus the
    candidate side when ``q_all`` is None: the candidates are the anchors, and one buffer takes both
    roles); dq_all, dd_all [N, D] and dn_all [N, H, D] the candidate side. A tensor with no role in
    the selected directions comes back with 0 rows (dn_all: H = 0). ``dots`` [] float32 is the sum
    over every input and role of <X, dF/dX> when ``want_dots`` (the temperature's gradient), else 0;
    with ``normalize``, X are the unit vectors and the gradients are taken back through the
    normalisation (the projection, in finish).

    Memory: each gradient is accumulated in a float32 buffer that is scaled, dotted and cast before
    the next is allocated, so at most one float32 buffer is alive beside the outputs.
    """
    shared = q_all is None
    q_all, d_all = (q, d) if shared else (q_all, d_all)
    (n_anchor, dim), n_cand = q.shape, q_all.shape[0]
    norms = _Norms(normalize, scale, q, d, q_all, d_all, n_all, shared)  # recomputed: O(N D) reads
    seg_args, n_hard = _segments(q_all, d_all, n_all, norms)
    g, has_groups = _groups_arg(groups, q)
    precision = _precision(q.dtype)
    n_rows = 2 if d2q else 1
    grad_lse, lse = grad_stats[:n_rows], stats[:n_rows].contiguous()
    # The positive logit p_i = scale * q_i . d_i: dF/dq_i += c_i d_i and dF/dd_i += c_i q_i, with
    # c_i = scale * grad_p_i, added to the anchor-side buffers in finish.
    pos_coef = (grad_stats[n_rows].float() * scale).contiguous()
    # Upstream weights are rescaled to max |w| = 1 before the kernels multiply them into P and cast to
    # the input dtype (float16 would flush 1/N-sized products to zero); the factor comes back in finish.
    w_max = grad_lse.abs().amax()
    coef = (grad_lse * torch.where(w_max > 0, 1.0 / w_max, torch.zeros_like(w_max))).float().contiguous()
    lse_d, coef_d = (lse[1], coef[1]) if d2q else (lse[0], coef[0])
    factor = (scale * w_max).float().reshape(1)
    dots = torch.zeros((), dtype=torch.float32, device=q.device)

    def anchor(a, x):
        """Anchor side of x (a = 0: query anchors over q2d (+ q2q); a = 1: documents, d2q (+ d2d))."""
        dx = _empty((n_anchor, dim), q)
        _anchor_grad_kernel[_grid_rows(n_anchor)](
            dx, dx.stride(0), dx.stride(1), x, x.stride(0), x.stride(1), norms.d if a else norms.q, *seg_args,
            g, scale, lse[a], coef[a], n_anchor, n_cand, offset, dim, n_hard, **_anchor_flags(a == 1, q2q, d2d),
            HAS_GROUPS=has_groups, NORMED=normalize, PRECISION=precision,
        )
        return dx

    def candidate(y, r_y, use_qa, qa_excl, use_da, da_excl, group, into=None):
        """Candidate side of y [N, D] or [N, K, D] (axis 1 of the grid walks the K segments; r_y its
        inverse norms, [K, N]): a new buffer shaped like y, or added to ``into`` (the same tensor's
        anchor side)."""
        dy = into if into is not None else _empty(y.shape, q)
        y3, dy3 = (y, dy) if y.dim() == 3 else (y.unsqueeze(1), dy.unsqueeze(1))
        k = y3.shape[1]
        _candidate_grad_kernel[lambda meta: (triton.cdiv(n_cand, meta["BLOCK_N"]), k)](
            dy3, dy3.stride(0), dy3.stride(2), dy3.stride(1), y3, y3.stride(0), y3.stride(2), y3.stride(1), r_y,
            q, q.stride(0), q.stride(1), norms.q, d, d.stride(0), d.stride(1), norms.d, g, scale,
            lse[0], coef[0], lse_d, coef_d, n_anchor, n_cand, offset, dim, n_hard,
            USE_QA=use_qa, QA_EXCL=qa_excl, USE_DA=use_da, DA_EXCL=da_excl, GROUP=group,
            ACCUMULATE=into is not None, NORMED=normalize, PRECISION=precision,
        )
        return dy

    def finish(buf, x, r, partner=None, r_partner=None):
        """x's gradient in its dtype from its float32 buffer (``_epilogue_kernel``: the factor, the
        positive logit's term when x is an anchor whose pair is ``partner``, the normalisation), written
        over the buffer for float32; <unit(x), grad> is added to dots."""
        nonlocal dots
        out = buf if x.dtype == torch.float32 else _empty(x.shape, q, x.dtype)
        x3, buf3, out3 = (t if t.dim() == 3 else t.unsqueeze(1) for t in (x, buf, out))
        n_x, k = x3.shape[0], x3.shape[1]
        row_dots = _empty((n_x * k,), q)
        p = partner if partner is not None else x3  # a valid pointer, never read without HAS_PARTNER
        _epilogue_kernel[(triton.cdiv(n_x * k, EPILOGUE["BLOCK_R"]),)](
            out3, out3.stride(0), out3.stride(1), out3.stride(2), buf3, buf3.stride(0), buf3.stride(1), buf3.stride(2),
            x3, x3.stride(0), x3.stride(1), x3.stride(2), r, p, p.stride(0), p.stride(-1),
            norms.q if r_partner is None else r_partner, pos_coef, factor, row_dots, n_x, k, dim,
            HAS_PARTNER=partner is not None, NORMED=normalize, **EPILOGUE,
        )
        if want_dots:
            dots = dots + row_dots.sum()
        return out

    def none_like(x):
        return x.new_empty((0, *x.shape[1:]))

    # Roles. Queries as candidates: q2q (minus self) and d2q. Positives as candidates: q2d and d2d
    # (minus the anchor's own pair). Hard negatives: q2d and d2d (minus own pair), never group-masked.
    q_cand = dict(use_qa=q2q, qa_excl=True, use_da=d2q, da_excl=False, group=has_groups)
    d_cand = dict(use_qa=True, qa_excl=False, use_da=d2d, da_excl=True, group=has_groups)
    if shared:
        dq = anchor(0, q)
        if q2q or d2q:
            candidate(q, norms.q, **q_cand, into=dq)
        dq = finish(dq, q, norms.q, partner=d, r_partner=norms.d)
        dd = candidate(d, norms.d, **d_cand, into=anchor(1, d) if d2q else None)
        dd = finish(dd, d, norms.d, partner=q, r_partner=norms.q)
        dq_all, dd_all = none_like(q), none_like(d)
    else:
        dq = finish(anchor(0, q), q, norms.q, partner=d, r_partner=norms.d)
        # Without d2q the local documents are anchors of the positive logit only.
        dd = finish(anchor(1, d) if d2q else torch.zeros(d.shape, dtype=torch.float32, device=d.device),
                    d, norms.d, partner=q, r_partner=norms.q)
        if q2q or d2q:
            dq_all = finish(candidate(q_all, norms.q_all, **q_cand), q_all, norms.q_all)
        else:
            dq_all = none_like(q_all)
        dd_all = finish(candidate(d_all, norms.d_all, **d_cand), d_all, norms.d_all)
    if n_hard:
        dn_all = finish(candidate(n_all, norms.n_all_t, True, False, d2d, True, False), n_all, norms.n_all)
    else:
        dn_all = q.new_empty((n_cand, 0, dim))
    return dq, dd, dq_all, dd_all, dn_all, dots


@row_lse_backward_op.register_fake
def _(grad_stats, stats, q, d, q_all, d_all, n_all, groups, scale, offset, q2q, d2q, d2d, normalize, want_dots):
    shared = q_all is None
    q_all, d_all = (q, d) if shared else (q_all, d_all)
    n_hard = 0 if n_all is None else n_all.shape[1]

    def rows(x, present):
        return x.new_empty(x.shape if present else (0, *x.shape[1:]))

    dn_all = n_all.new_empty(n_all.shape) if n_hard else q.new_empty((q_all.shape[0], 0, q.shape[1]))
    return (rows(q, True), rows(d, True), rows(q_all, not shared and (q2q or d2q)),
            rows(d_all, not shared), dn_all, q.new_empty((), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    q, d, q_all, d_all, n_all, groups, scale, offset, q2q, d2q, d2d, normalize = inputs
    ctx.save_for_backward(q, d, q_all, d_all, n_all, groups, scale, output)  # inputs and [A + 1, n] stats
    ctx.flags = (offset, q2q, d2q, d2d, normalize)


def _backward(ctx, grad_stats):
    q, d, q_all, d_all, n_all, groups, scale, stats = ctx.saved_tensors
    want_dots = ctx.needs_input_grad[6]
    *grads, dots = row_lse_backward_op(grad_stats.contiguous(), stats, q, d, q_all, d_all, n_all, groups,
                                       scale, *ctx.flags, want_dots)
    # A tensor with no role in the selected directions gets no gradient (it came back with 0 rows).
    dq, dd, dq_all, dd_all, dn_all = (None if x is None or gx.shape != x.shape else gx
                                      for x, gx in zip((q, d, q_all, d_all, n_all), grads))
    # Homogeneity (module docstring): dF/dscale = sum_X <X, dF/dX> / (2 scale), over every input in
    # every role it plays (anchor and candidate); the op summed the dots before casting.
    dscale = (dots / (2 * scale)).to(scale.dtype) if want_dots else None
    return dq, dd, dq_all, dd_all, dn_all, None, dscale, None, None, None, None, None


row_lse_op.register_autograd(_backward, setup_context=_setup_context)


def row_stats_triton(q: torch.Tensor, d: torch.Tensor, q_all: torch.Tensor, d_all: torch.Tensor,
                     n_all: torch.Tensor | None, scale: float | torch.Tensor, group_ids: torch.Tensor | None,
                     offset: int, options: LossOptions, normalize: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused counterpart of ``row_lse_torch`` (same arguments): the [A, n] float32 log-partitions, and
    the [n] float32 positive logits ``scale * q_i . d_i`` (one op, so their gradients share buffers).

    Embeddings are read in their own dtype and strides; ``scale`` (1 / temperature) may be a float or
    a 0-dim tensor (its gradient is returned). When the candidates are the anchors themselves
    (``q_all is q and d_all is d``), each tensor's two roles share one gradient buffer. ``normalize``:
    the kernels use each embedding's unit vector, scaling logit tiles by inverse norms (no copy);
    float16 inputs must not use it (products of probabilities and inverse norms, cast to float16 in
    the backward, could leave its range), the caller normalises them into a copy instead.
    """
    if not isinstance(scale, torch.Tensor):
        scale = torch.full((), scale, dtype=torch.float32, device=q.device)
    if q_all is q and d_all is d:
        q_all = d_all = None
    stats = row_lse_op(q, d, q_all, d_all, n_all, group_ids, scale.float(), offset,
                       options.q2q, options.d2q, options.d2d, normalize)
    return stats[:-1], stats[-1]
