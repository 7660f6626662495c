"""Eager torch implementation of the per-anchor log-partitions (materialises the logit blocks).

It is the fallback on every device and the baseline the fused kernel is measured against. Autograd
provides its gradients; the reference in ``reference/`` defines what they must be.
"""

from __future__ import annotations

import torch

from ._options import LossOptions


def keep_masks(n_anchor: int, n_cand: int, n_blocks: int, offset: int, group_ids: torch.Tensor | None,
               device: torch.device):
    """Keep-masks of the four logit blocks (True = the entry is in the sums).

    Anchor i is pair ``offset + i`` of the N = ``n_cand`` candidate pairs (``offset`` > 0 when the
    anchors are one rank's slice of a gathered batch). Returns ``(keep_qd [n, M], keep_qq [n, N],
    keep_dq [n, N], keep_dd [n, M])`` with M = N * n_blocks and document column (j, k) at index
    k * N + j. For anchor i and j != i in i's group (``group_ids`` [N], global), column (j, 0) and
    q_j are removed; q2q also drops q_i itself and d2d every column (i, k) of pair i.
    """
    rows = torch.arange(n_anchor, device=device)[:, None] + offset
    eye = rows == torch.arange(n_cand, device=device)[None, :]
    if group_ids is None:
        same_group = eye
    else:
        same_group = group_ids[offset:offset + n_anchor, None] == group_ids[None, :]
    other_in_group = same_group & ~eye
    hard = torch.zeros(n_anchor, n_cand * (n_blocks - 1), dtype=torch.bool, device=device)
    group_cols = torch.cat([other_in_group, hard], dim=1)
    own_pair = eye.repeat(1, n_blocks)
    return ~group_cols, ~same_group, ~other_in_group, ~(own_pair | group_cols)


def document_columns(docs: torch.Tensor, hard_negatives: torch.Tensor | None) -> torch.Tensor:
    """[M, D] document columns: block 0 the positives, block k the k-th hard negative of every pair."""
    if hard_negatives is None or hard_negatives.shape[1] == 0:
        return docs
    return torch.cat([docs, hard_negatives.transpose(0, 1).reshape(-1, docs.shape[1])], dim=0)


def row_lse_torch(
    q: torch.Tensor,
    d: torch.Tensor,
    q_all: torch.Tensor,
    d_all: torch.Tensor,
    n_all: torch.Tensor | None,
    scale: float | torch.Tensor,
    group_ids: torch.Tensor | None,
    offset: int,
    options: LossOptions,
) -> torch.Tensor:
    """Log-partitions of the query and document anchors.

    Parameters
    ----------
    q, d : [n, D] anchor embeddings, already normalised if asked, in the compute dtype.
    q_all, d_all : [N, D] candidate queries and positives (the same tensors as ``q``, ``d`` unless the
        batch was gathered across devices); anchor i is pair ``offset + i`` among them.
    n_all : [N, H, D] candidate hard negatives, or None.
    scale : 1 / temperature (float or 0-dim tensor).
    group_ids : [N] int64 (global) or None.

    Returns
    -------
    [A, n] tensor: row 0 is log Zq (q2d + q2q), row 1 (when documents are anchors, d2q and/or d2d,
    A = 2) log Zd (d2q + d2d).
    """
    n_anchor, n_cand = q.shape[0], q_all.shape[0]
    cols = document_columns(d_all, n_all)
    n_blocks = cols.shape[0] // n_cand
    keep_qd, keep_qq, keep_dq, keep_dd = keep_masks(n_anchor, n_cand, n_blocks, offset, group_ids, q.device)

    def masked(s: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return s.masked_fill(~keep, float("-inf"))

    raw_qd = q @ cols.T
    s_qd = raw_qd * scale
    if options.hardness:
        # The hardness penalty alpha * stop_grad(raw similarity) on the selected q2d negatives.
        pen = hardness_mask(n_anchor, n_cand, n_blocks, offset, options.hardness_mode, q.device)
        s_qd = s_qd + options.hardness * raw_qd.detach() * pen
    q_parts = [masked(s_qd, keep_qd)]
    del raw_qd, s_qd  # N x M blocks: not held past their use
    if options.q2q:
        q_parts.append(masked(q @ q_all.T * scale, keep_qq))
    rows = [torch.logsumexp(torch.cat(q_parts, dim=1), dim=1)]
    d_parts = []
    if options.d2q:
        d_parts.append(masked(d @ q_all.T * scale, keep_dq))
    if options.d2d:
        d_parts.append(masked(d @ cols.T * scale, keep_dd))
    if d_parts:
        rows.append(torch.logsumexp(torch.cat(d_parts, dim=1), dim=1))
    return torch.stack(rows)


def hardness_mask(n_anchor: int, n_cand: int, n_blocks: int, offset: int, mode: str, device) -> torch.Tensor:
    """[n, M] float mask of the q2d entries that take the hardness penalty: "in_batch_negatives" the
    columns of other pairs, "hard_negatives" the anchor's own hard negatives, "all_negatives" every
    column but the anchor's own positive (column (j, k) at k * N + j; anchor i is pair offset + i)."""
    rows = torch.arange(n_anchor, device=device)[:, None] + offset
    own = (rows == torch.arange(n_cand, device=device)[None, :]).repeat(1, n_blocks)
    hard = (torch.arange(n_cand * n_blocks, device=device) >= n_cand)[None, :]
    chosen = {"in_batch_negatives": ~own, "hard_negatives": own & hard, "all_negatives": ~own | hard}[mode]
    return chosen.float()
