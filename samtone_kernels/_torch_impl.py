"""Eager torch backend: the per-anchor log-partitions from materialised logit blocks.

It runs on every device torch runs on (CPU, MPS, XPU, a GPU without triton) and is the baseline the
fused kernel is measured against. Autograd provides its gradients; the reference in ``reference/``
defines what they must be.

Memory: anchors go in row chunks (``row_lse_torch``), so the logits live c x M at a time for a chunk
of c rows chosen from ``CHUNK_BYTES``. A batch whose logits fit in one chunk takes exactly the
unchunked path. With several chunks, each is checkpointed: its logits are freed after the forward
and recomputed in the backward, one chunk at a time, so the peak is O(c * M) instead of O(N * M),
for one more logit matmul per block (4 matmuls where 3 are textbook).

Work: in one process and one chunk the d2q logits D Q^T are the transposed first block of the q2d
logits Q D^T, so one matmul (and its two backward matmuls) serves both directions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ._constants import NORM_EPS
from ._contract import LossOptions, Rows

# Budget of one chunk's logit buffers (bytes). Above it, the anchors are split into chunks of rows.
CHUNK_BYTES = 1 << 30
# float buffers of a chunk's full width alive at once in the forward and its autograd (logits, masked
# logits, their concatenation, the softmax): the factor between the logits and the peak.
_LIVE_BUFFERS = 4


def prepare_torch(embeddings: list[torch.Tensor], options: LossOptions) -> list[torch.Tensor]:
    """Half inputs are upcast once (logits, softmax and statistics all in float32, float64 stays
    float64), then normalised if asked."""
    dtype = torch.float64 if embeddings[0].dtype == torch.float64 else torch.float32
    prepared = [x.to(dtype) for x in embeddings]
    if options.normalize:
        prepared = [F.normalize(x, dim=-1, eps=NORM_EPS) for x in prepared]
    return prepared


def row_stats_torch(rows: Rows, options: LossOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch backend's ``row_stats`` (see ``_backends``): (lse [A, n], pos [n])."""
    lse = row_lse_torch(rows.q, rows.d, rows.q_all, rows.d_all, rows.n_all, rows.scale, rows.group_ids,
                        rows.offset, options)
    return lse, (rows.q * rows.d).sum(-1) * rows.scale


def row_bytes(n_cand: int, n_cols: int, options: LossOptions, itemsize: int) -> int:
    """Bytes one anchor row costs a chunk: ``_LIVE_BUFFERS`` float buffers of the widest anchor row
    (a query row: M document columns + N queries with q2q; a document row likewise)."""
    width = max(n_cols + (n_cand if options.q2q else 0),
                (n_cand if options.d2q else 0) + (n_cols if options.d2d else 0))
    return _LIVE_BUFFERS * width * itemsize


@contextlib.contextmanager
def chunk_budget(nbytes: int) -> Iterator[None]:
    """``CHUNK_BYTES = nbytes`` inside the block, restored after it. The chunks are fixed in the
    forward (the backward recomputes them as they were), so only the forward needs to be inside."""
    global CHUNK_BYTES
    saved, CHUNK_BYTES = CHUNK_BYTES, nbytes
    try:
        yield
    finally:
        CHUNK_BYTES = saved


def chunk_rows(n_cand: int, n_cols: int, options: LossOptions, itemsize: int, budget: int | None = None) -> int:
    """Anchor rows per chunk: as many as fit the budget (``CHUNK_BYTES`` by default); at least 1."""
    return max(1, (CHUNK_BYTES if budget is None else budget) // row_bytes(n_cand, n_cols, options, itemsize))


def budget_for_rows(rows: int, n_cand: int, n_cols: int, options: LossOptions, itemsize: int) -> int:
    """The budget whose chunks hold ``rows`` anchor rows (``chunk_rows``'s inverse)."""
    return rows * row_bytes(n_cand, n_cols, options, itemsize)


def drop_masks(n_anchor: int, n_cand: int, n_blocks: int, offset: int, group_ids: torch.Tensor | None,
               device: torch.device):
    """Masks of the entries left out of the four logit blocks (True = not in the sums), None for a
    block that keeps every entry.

    Anchor i is pair ``offset + i`` of the N = ``n_cand`` candidate pairs (``offset`` > 0 when the
    anchors are one rank's slice of a gathered batch). Returns ``(drop_qd [n, M] or None, drop_qq
    [n, N], drop_dq [n, N] or None, drop_dd [n, M])`` with M = N * n_blocks and document column (j, k)
    at index k * N + j. For anchor i and j != i in i's group (``group_ids`` [N], global), column
    (j, 0) and q_j are dropped; q2q also drops q_i itself and d2d every column (i, k) of pair i.
    Without groups q2d and d2q drop nothing (None: no masking pass).
    """
    rows = torch.arange(n_anchor, device=device)[:, None] + offset
    eye = rows == torch.arange(n_cand, device=device)[None, :]
    own_pair = eye.repeat(1, n_blocks)
    if group_ids is None:
        return None, eye, None, own_pair
    same_group = group_ids[offset:offset + n_anchor, None] == group_ids[None, :]
    other_in_group = same_group & ~eye
    hard = torch.zeros(n_anchor, n_cand * (n_blocks - 1), dtype=torch.bool, device=device)
    group_cols = torch.cat([other_in_group, hard], dim=1)
    return group_cols, same_group, other_in_group, own_pair | group_cols


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
    budget: int | None = None,
) -> torch.Tensor:
    """Log-partitions of the query and document anchors, in row chunks (see the module notes).

    Parameters
    ----------
    q, d : [n, D] anchor embeddings, already normalised if asked, in the compute dtype.
    q_all, d_all : [N, D] candidate queries and positives (the same tensors as ``q``, ``d`` unless the
        batch was gathered across devices); anchor i is pair ``offset + i`` among them.
    n_all : [N, H, D] candidate hard negatives, or None.
    scale : 1 / temperature (float or 0-dim tensor).
    group_ids : [N] int64 (global) or None.
    budget : bytes of one chunk's logit buffers (default ``CHUNK_BYTES``).

    Returns
    -------
    [A, n] tensor: row 0 is log Zq (q2d + q2q), row 1 (when documents are anchors, d2q and/or d2d,
    A = 2) log Zd (d2q + d2d).
    """
    cols = document_columns(d_all, n_all)
    step = chunk_rows(q_all.shape[0], cols.shape[0], options, q.element_size(), budget)
    if step >= q.shape[0]:
        return row_lse_block(q, d, q_all, cols, scale, group_ids, offset, options,
                             anchors_are_candidates=q is q_all and d is d_all and offset == 0)
    # Each chunk is checkpointed: its logits are recomputed in the backward (one chunk alive at a time).
    return torch.cat([checkpoint(row_lse_block, q[r0:r0 + step], d[r0:r0 + step], q_all, cols, scale, group_ids,
                                 offset + r0, options, use_reentrant=False)
                      for r0 in range(0, q.shape[0], step)], dim=1)


def row_lse_block(
    q: torch.Tensor,
    d: torch.Tensor,
    q_all: torch.Tensor,
    cols: torch.Tensor,
    scale: float | torch.Tensor,
    group_ids: torch.Tensor | None,
    offset: int,
    options: LossOptions,
    anchors_are_candidates: bool = False,
) -> torch.Tensor:
    """Log-partitions of the query and document anchors ``q``, ``d``, from their whole logit rows.

    Parameters
    ----------
    q, d : [n, D] anchor embeddings, already normalised if asked, in the compute dtype.
    q_all : [N, D] candidate queries (the same tensor as ``q`` unless the batch was gathered across
        devices or ``q`` is a chunk of it); anchor i is pair ``offset + i`` among them.
    cols : [M, D] document columns, ``document_columns(d_all, n_all)``.
    scale : 1 / temperature (float or 0-dim tensor).
    group_ids : [N] int64 (global) or None.
    anchors_are_candidates : ``q`` is ``q_all`` and ``d`` is ``cols``' first block (one process, one
        chunk): the d2q logits are then the transposed first block of the q2d ones, and one matmul
        serves both.

    Returns
    -------
    [A, n] tensor: row 0 is log Zq (q2d + q2q), row 1 (when documents are anchors, d2q and/or d2d,
    A = 2) log Zd (d2q + d2d).
    """
    n_anchor, n_cand = q.shape[0], q_all.shape[0]
    n_blocks = cols.shape[0] // n_cand
    drop_qd, drop_qq, drop_dq, drop_dd = drop_masks(n_anchor, n_cand, n_blocks, offset, group_ids, q.device)

    def masked(s: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
        return s if drop is None else s.masked_fill(drop, float("-inf"))

    def lse(parts: list[torch.Tensor]) -> torch.Tensor:  # one block alone is not copied into a cat
        return torch.logsumexp(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1), dim=1)

    # The temperature scales the [n, D] anchors, not the N x M logits: no N x M pass for it, forward
    # or backward (d scale = sum(dQs * Q) over n x D).
    q_s = q * scale
    s_qd = q_s @ cols.T
    d_parts = []
    d_s = d * scale if options.d2d or (options.d2q and not anchors_are_candidates) else None
    if options.d2q:
        # D Q^T = (Q D^T)^T where the anchors are the candidates: one matmul for q2d and d2q, and
        # autograd adds both blocks' gradients into its output before its two backward matmuls
        # (symmetric InfoNCE: 3 matmuls, not 6).
        if anchors_are_candidates:  # the whole block where there are no hard negatives (no slice to undo)
            s_dq = (s_qd if cols.shape[0] == n_cand else s_qd[:, :n_cand]).T
        else:
            s_dq = d_s @ q_all.T
        d_parts.append(masked(s_dq, drop_dq))
        del s_dq
    if options.hardness:
        # The hardness penalty alpha * stop_grad(raw similarity) on the selected q2d negatives; the raw
        # similarity is s / scale.
        pen = hardness_mask(n_anchor, n_cand, n_blocks, offset, options.hardness_mode, q.device)
        raw = s_qd.detach() / (scale.detach() if isinstance(scale, torch.Tensor) else scale)
        s_qd = s_qd + options.hardness * raw * pen
        del raw
    q_parts = [masked(s_qd, drop_qd)]
    del s_qd  # N x M blocks: not held past their use
    if options.q2q:
        q_parts.append(masked(q_s @ q_all.T, drop_qq))
    rows = [lse(q_parts)]
    if options.d2d:
        d_parts.append(masked(d_s @ cols.T, drop_dd))
    if d_parts:
        rows.append(lse(d_parts))
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
