"""Own hard negatives (``hard_negative_scope="own"``): each query's H mined negatives as a per-row
segment of N x H logits, beside whichever backend scores the in-batch blocks.

With the scope "own", pair i's hard negatives are candidates of query i alone (in q2d), so they
form N x H logits, not the N x N H of the shared layout where every query sees every pair's. They
are no tile of the backends' walks: ``add_own_negatives`` computes them here as row-wise dot
products (``_RowDots``: one read of the hard negatives in the forward and one in the backward, what
a kernel walking them row by row would read, O(N H D)) and folds their log-sum-exp into the
queries' log-partition. The backend scores the in-batch blocks alone (no hard negatives reach it),
so no document anchor sees them either (d2d keeps the in-batch documents).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._constants import NORM_EPS
from ._contract import LossOptions
from ._rows import row_chunks


def _accumulate(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _RowDots(torch.autograd.Function):
    """c [N, H] with ``c[i, h] = u_i . v_ih``, u and v the rows of q [N, D] and n [N, H, D], divided
    by their norms (``max(|x|, 1e-12)``) when ``normalize``: in float32 (float64 for float64 inputs),
    in row chunks, saving only the inputs and their inverse norms."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, n: torch.Tensor, normalize: bool) -> torch.Tensor:
        acc = _accumulate(q)
        out = q.new_empty(n.shape[:2], dtype=acc)
        inv_q = q.new_ones(q.shape[0], dtype=acc)
        inv_n = q.new_ones(n.shape[:2], dtype=acc)
        for c in row_chunks(n):
            qc, nc = q[c].to(acc), n[c].to(acc)
            if normalize:
                inv_q[c] = 1.0 / torch.linalg.vector_norm(qc, dim=-1).clamp_min(NORM_EPS)
                inv_n[c] = 1.0 / torch.linalg.vector_norm(nc, dim=-1).clamp_min(NORM_EPS)
            out[c] = torch.einsum("nd,nhd->nh", qc, nc) * inv_q[c, None] * inv_n[c]
        ctx.normalize = normalize
        ctx.save_for_backward(q, n, inv_q, inv_n, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        # Without normalisation c_ih = q_i . n_ih: dq_i = sum_h g_ih n_ih, dn_ih = g_ih q_i.
        # With it, u = r_q q and v = r_n n (r = 1 / max(|x|, eps)) and c = u . v. Where |q| > eps,
        # du/dq = r_q (I - u u^T), so dc/dq = r_q (v - c u); at or below eps the divisor is the
        # constant eps, du/dq = r_q I, dc/dq = r_q v. Likewise for n. Hence
        #   dq_i = r_q_i (sum_h g_ih v_ih - [|q_i| > eps] (sum_h g_ih c_ih) u_i),
        #   dn_ih = g_ih r_n_ih (u_i - [|n_ih| > eps] c_ih v_ih).
        q, n, inv_q, inv_n, c_all = ctx.saved_tensors
        acc = inv_q.dtype
        dq, dn = torch.empty_like(q), torch.empty_like(n)
        for c in row_chunks(n):
            gc = g[c].to(acc)
            qc, nc = q[c].to(acc), n[c].to(acc)
            rq, rn = inv_q[c], inv_n[c]
            u, v = qc * rq[:, None], nc * rn[..., None]
            dq_c = torch.einsum("nh,nhd->nd", gc, v)
            dn_c = gc[..., None] * u[:, None, :]
            if ctx.normalize:
                cc = c_all[c]
                above_q = (rq < 1.0 / NORM_EPS).to(acc)  # |q| > eps
                above_n = (rn < 1.0 / NORM_EPS).to(acc)
                dq_c = rq[:, None] * (dq_c - (above_q * (gc * cc).sum(1))[:, None] * u)
                dn_c = rn[..., None] * (dn_c - (gc * cc * above_n)[..., None] * v)
            dq[c], dn[c] = dq_c.to(q.dtype), dn_c.to(n.dtype)
        return dq, dn, None


def add_own_negatives(
    lse: torch.Tensor,
    pos: torch.Tensor,
    queries: torch.Tensor,
    hard_negatives: torch.Tensor,
    scale: float | torch.Tensor,
    options: LossOptions,
) -> torch.Tensor:
    """The queries' log-partitions with their own hard negatives folded in.

    Parameters
    ----------
    lse : [A, n] the backend's log-partitions of the in-batch blocks (row 0: the query anchors').
    pos : [n] the positive logits ``scale * q_i . d_i`` (the margin's reference).
    queries : [n, D] and hard_negatives : [n, H, D], this process's, as the user passed them.
    scale : 1 / temperature (float or 0-dim tensor).

    Returns
    -------
    [A, n]: row 0 ``log(exp(lse[0]) + sum_h exp(s_ih))`` with ``s_ih = scale * q_i . n_ih`` (cosines
    with ``normalize``), plus the hardness penalty ``alpha * stop_grad(q_i . n_ih)`` where the mode
    weighs hard negatives, and without the entries the false-negative margin drops.
    """
    raw = _RowDots.apply(queries, hard_negatives, options.normalize)  # [n, H] similarities
    s = raw * scale
    if options.hardness and options.hardness_mode in ("hard_negatives", "all_negatives"):
        s = s + options.hardness * raw.detach()
    if options.false_negative_margin is not None:
        # The positive similarity q_i . d_i as the backend scored it (pos / scale), plus the margin.
        positive = pos.detach() / (scale.detach() if isinstance(scale, torch.Tensor) else scale)
        s = s.masked_fill(raw.detach() > (positive + options.false_negative_margin)[:, None], float("-inf"))
    row = torch.logaddexp(lse[0], torch.logsumexp(s, dim=1))
    return torch.cat([row[None], lse[1:]])
