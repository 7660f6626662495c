"""Eager torch backend: the per-anchor log-partitions from materialised logit blocks.

It runs on every device torch runs on (CPU, MPS, XPU, a GPU without triton) and is the baseline the
fused kernel is measured against. Autograd provides its gradients; the reference in ``reference/``
defines what they must be.

Memory: anchors go in row chunks (``row_lse_torch``), so the logits live c x M at a time for a chunk
of c rows chosen from the budget (``chunk_bytes``, default ``CHUNK_BYTES``). A batch whose logits fit
in one chunk takes exactly the unchunked path. With several chunks, each is checkpointed: its logits
are freed after the forward and recomputed in the backward, one chunk at a time, so the peak is
O(c * M) instead of O(N * M), for one more logit matmul per block (4 matmuls where 3 are textbook).

Blocks, masks and hardness come from ``_plan.BLOCKS``, the table the fused kernels read: one logit
matmul per block, minus the removed entries (``dropped``), plus the penalty (``penalised``).

Work: in one process and one chunk the d2q logits D Q^T are the transposed q2d logits Q D^T of the
positives, so one matmul (and its two backward matmuls) serves both directions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import _plan
from ._constants import NORM_EPS
from ._contract import LossOptions, Rows
from ._gemm import HALF, matmul_f32
from ._rows import normalize_rows, prefix_dots, prefix_inverse_norms

# Budget of one chunk's logit buffers (bytes). Above it, the anchors are split into chunks of rows.
CHUNK_BYTES = 1 << 30
# float buffers of a chunk's full width alive at once in the forward and its autograd (logits, masked
# logits, their concatenation, the softmax): the factor between the logits and the peak.
_LIVE_BUFFERS = 4


def gemms_in_input_dtype(x: torch.Tensor) -> bool:
    """Whether 16-bit inputs go into the logit GEMMs as they are (float32 output, ``_gemm``): on CUDA,
    where a float32 GEMM is several times slower than a 16-bit one. Elsewhere they are upcast once."""
    return x.dtype in HALF and x.is_cuda


def prepare_torch(embeddings: list[torch.Tensor], options: LossOptions) -> list[torch.Tensor]:
    """16-bit inputs stay 16-bit where ``gemms_in_input_dtype`` (normalised in float32 and rounded
    back, as the GEMMs take them); elsewhere they are upcast once (logits, softmax and statistics all
    in float32, float64 stays float64), then normalised if asked."""
    normalize = options.normalize and options.matryoshka_dims is None  # (each prefix its own norms)
    if gemms_in_input_dtype(embeddings[0]):
        return [normalize_rows(x) for x in embeddings] if normalize else list(embeddings)
    dtype = torch.float64 if embeddings[0].dtype == torch.float64 else torch.float32
    prepared = [x.to(dtype) for x in embeddings]
    if normalize:
        prepared = [F.normalize(x, dim=-1, eps=NORM_EPS) for x in prepared]
    return prepared


def row_stats_torch(rows: Rows, options: LossOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch backend's ``row_stats`` (see ``_backends``): (lse [A, n], pos [n]); with Matryoshka
    prefixes (lse [K, A, n], pos [K, n]), one per prefix."""
    lse = row_lse_torch(
        rows.q,
        rows.d,
        rows.q_all,
        rows.d_all,
        rows.n_all,
        rows.scale,
        rows.group_ids,
        rows.offset,
        options,
        budget=options.chunk_bytes,
    )
    if options.matryoshka_dims is not None:
        return lse, prefix_dots(rows.q, rows.d, options.matryoshka_dims, options.normalize) * rows.scale
    return lse, _dots(rows.q, rows.d) * rows.scale


def _dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise a_i . b_i, in float32 for 16-bit rows."""
    if a.dtype in HALF:
        a, b = a.float(), b.float()
    return (a * b).sum(-1)


def row_bytes(n_cand: int, n_cols: int, options: LossOptions, itemsize: int) -> int:
    """Bytes one anchor row costs a chunk: ``_LIVE_BUFFERS`` float buffers of the widest anchor row,
    the sum of its blocks' widths (a query row: M document columns + N queries with q2q; a document
    row likewise)."""
    width = {"q": n_cand, "d": n_cand, "n": n_cols - n_cand}
    rows = {"q": 0, "d": 0}
    for block in _plan.selected(options.directions):
        rows[block.anchor] += width[block.segment]
    return _LIVE_BUFFERS * max(rows.values()) * itemsize


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


def _pairs(n_cols: int, width: int, device: torch.device) -> torch.Tensor:
    """[W] the pair index of each column of a segment of ``width`` columns per pair (a hard-negative
    segment ``n_all.reshape(N * H, D)`` has H columns per pair, in pair order)."""
    return torch.arange(n_cols, device=device) // width


def dropped(
    block: _plan.Block,
    rows_g: torch.Tensor,
    col_pairs: torch.Tensor,
    group_ids: torch.Tensor | None,
    presumed: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """[n, W] mask of the entries ``block`` removes (True = not in the sums), or None when it removes
    none: the anchor's own pair (``SELF``), the other pairs of its group (``GROUP``, only with group
    ids), and the presumed false negatives of the margin (``presumed`` [n, W], except the anchor's
    own positive where the block holds it). ``rows_g`` [n] and ``col_pairs`` [W] are global pair
    indices."""
    own = rows_g[:, None] == col_pairs[None, :]
    drop = own if block.drops & _plan.SELF else None
    if block.drops & _plan.GROUP and group_ids is not None:
        mates = (group_ids[rows_g][:, None] == group_ids[col_pairs][None, :]) & ~own
        drop = mates if drop is None else drop | mates
    if presumed is not None:
        if block.holds_positive:
            presumed = presumed & ~own
        drop = presumed if drop is None else drop | presumed
    return drop


def penalised(
    s: torch.Tensor,
    block: _plan.Block,
    options: LossOptions,
    scale: float | torch.Tensor,
    rows_g: torch.Tensor,
    col_pairs: torch.Tensor,
) -> torch.Tensor:
    """The logits s [n, W] of ``block`` plus the hardness penalty ``alpha * stop_grad(x . y)`` on the
    entries ``_plan.HARDNESS`` names (the raw similarity is s / scale)."""
    pen = block.penalty(options.hardness_mode) if options.hardness else 0
    if not pen:
        return s
    raw = s.detach() / (scale.detach() if isinstance(scale, torch.Tensor) else scale)
    if pen != _plan.OWN | _plan.OTHER:
        own = rows_g[:, None] == col_pairs[None, :]
        raw = raw * (own if pen == _plan.OWN else ~own)
    return s + options.hardness * raw


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
    A = 2) log Zd (d2q + d2d). With Matryoshka prefixes, [K, A, n] (``row_lse_block``).
    """
    if n_all is not None and n_all.shape[1] == 0:
        n_all = None
    n_cols = d_all.shape[0] * (1 + (0 if n_all is None else n_all.shape[1]))
    logit_size = 8 if q.dtype == torch.float64 else 4  # the logits are float32 for 16-bit inputs
    prefixes = 1 if options.matryoshka_dims is None else len(options.matryoshka_dims)  # each its logits
    step = chunk_rows(q_all.shape[0], n_cols, options, logit_size * prefixes, budget)
    if step >= q.shape[0]:
        return row_lse_block(
            q,
            d,
            q_all,
            d_all,
            n_all,
            scale,
            group_ids,
            offset,
            options,
            anchors_are_candidates=q is q_all and d is d_all and offset == 0,
        )
    # Each chunk is checkpointed: its logits are recomputed in the backward (one chunk alive at a time).
    return torch.cat(
        [
            checkpoint(
                row_lse_block,
                q[r0 : r0 + step],
                d[r0 : r0 + step],
                q_all,
                d_all,
                n_all,
                scale,
                group_ids,
                offset + r0,
                options,
                use_reentrant=False,
            )
            for r0 in range(0, q.shape[0], step)
        ],
        dim=-1,
    )


def masked(
    block: _plan.Block,
    s: torch.Tensor,
    row_pairs: torch.Tensor,
    col_pairs: torch.Tensor,
    scale: float | torch.Tensor,
    group_ids: torch.Tensor | None,
    positive: torch.Tensor | None,
    offset: int,
    options: LossOptions,
) -> torch.Tensor:
    """The logits s [n, W] of ``block`` as its softmax takes them: plus the hardness penalty, minus
    (as -inf) what it drops: the own pair, the group, and with the margin the entries whose raw
    similarity (s / scale) exceeds the anchor pair's ``positive`` [n] (indexed by ``row_pairs -
    offset``) plus the margin."""
    presumed = None
    if options.false_negative_margin is not None:
        raw = s.detach() / (scale.detach() if isinstance(scale, torch.Tensor) else scale)
        presumed = raw > (positive[row_pairs - offset] + options.false_negative_margin)[:, None]
    s = penalised(s, block, options, scale, row_pairs, col_pairs)
    drop = dropped(block, row_pairs, col_pairs, group_ids, presumed)
    return s if drop is None else s.masked_fill(drop, float("-inf"))


def row_lse_block(
    q: torch.Tensor,
    d: torch.Tensor,
    q_all: torch.Tensor,
    d_all: torch.Tensor,
    n_all: torch.Tensor | None,
    scale: float | torch.Tensor,
    group_ids: torch.Tensor | None,
    offset: int,
    options: LossOptions,
    anchors_are_candidates: bool = False,
) -> torch.Tensor:
    """Log-partitions of the query and document anchors ``q``, ``d``, from their whole logit rows,
    built block by block from ``_plan.BLOCKS`` (the same table the fused kernels read).

    With Matryoshka prefixes (``options.matryoshka_dims``) the inputs are not normalised
    (``prepare_torch`` leaves them raw: each prefix has its own norms). Per block, the prefixes' raw
    logits are running sums of one GEMM per slice of D, ``S_k = S_{k-1} + X[:, m_{k-1}:m_k] Y[:,
    m_{k-1}:m_k]^T``: the matmul work of one full-D block, not sum_k m_k / D of it. Each S_k (over the
    prefix norms with ``normalize``, times the scale) is masked and penalised as its own loss's.
    Autograd's backward of the running sum gives each slice the sum of the later prefixes' logit
    gradients, ``dX[:, slice_k] = (sum_{k' >= k} G_k') Y[:, slice_k]``: again one GEMM per slice and
    side.

    Parameters
    ----------
    q, d : [n, D] anchor embeddings, already normalised if asked (without prefixes), in the compute
        dtype.
    q_all, d_all : [N, D] candidate queries and positives (the same tensors as ``q``, ``d`` unless the
        batch was gathered across devices or ``q`` is a chunk of it); anchor i is pair ``offset + i``.
    n_all : [N, H, D] candidate hard negatives (H >= 1), or None.
    scale : 1 / temperature (float or 0-dim tensor).
    group_ids : [N] int64 (global) or None.
    anchors_are_candidates : ``q`` is ``q_all`` and ``d`` is ``d_all`` (one process, one chunk): a block
        whose transpose is also a block (q2d's positives and d2q) is then computed once, and autograd
        adds both blocks' gradients into it before its two backward matmuls (symmetric InfoNCE: 3
        matmuls, not 6).

    Returns
    -------
    [A, n] tensor: row 0 is log Zq (q2d + q2q), row 1 (when documents are anchors, d2q and/or d2d,
    A = 2) log Zd (d2q + d2d). With K Matryoshka prefixes, [K, A, n].
    """
    dims = options.matryoshka_dims
    device = q.device
    anchors = {"q": q, "d": d}
    segments = {"q": (q_all, 1), "d": (d_all, 1)}  # (rows, columns per pair)
    if n_all is not None:
        segments["n"] = (n_all.reshape(-1, n_all.shape[-1]), n_all.shape[1])  # a view: column (j, k) at j H + k
    rows_g = torch.arange(q.shape[0], device=device) + offset
    blocks = [b for b in _plan.selected(options.directions) if b.segment in segments]
    transposed = {(b.anchor, b.segment) for b in blocks} if anchors_are_candidates else set()
    parts: list[dict[str, list[torch.Tensor]]] = [{"q": [], "d": []} for _ in dims or (None,)]
    # The anchors' positive similarities q_i . d_i, [K, n] (rows of a transposed tile are anchors too:
    # there the anchors are the whole batch, offset 0).
    positive = None
    if options.false_negative_margin is not None:
        positive = (_dots(q, d)[None] if dims is None else prefix_dots(q, d, dims, options.normalize)).detach()
    logits = _BlockLogits(anchors, {k: x for k, (x, _) in segments.items()}, scale, options)

    done = set()
    for block in blocks:
        if (block.anchor, block.segment) in done:
            continue
        candidates, width = segments[block.segment]
        col_pairs = _pairs(candidates.shape[0], width, device)
        partner = (block.segment, block.anchor)
        partner_block = None
        if block.anchor != block.segment and partner in transposed:
            # The partner block's logits are this one's transpose (s(y_j, x_i) = S_ij): its entries
            # before this block's penalty; its rows are this block's columns.
            partner_block = next(b for b in blocks if (b.anchor, b.segment) == partner)
            done.add(partner)
        for k, s in enumerate(logits.of(block.anchor, block.segment)):
            pos_k = None if positive is None else positive[k]
            if partner_block is not None:
                parts[k][partner_block.anchor].append(
                    masked(partner_block, s.T, col_pairs, rows_g, scale, group_ids, pos_k, offset, options)
                )
            parts[k][block.anchor].append(masked(block, s, rows_g, col_pairs, scale, group_ids, pos_k, offset, options))
            del s  # N x M blocks: not held past their use
    lse = torch.stack(
        [
            torch.stack(
                [torch.logsumexp(p[0] if len(p) == 1 else torch.cat(p, dim=1), dim=1) for p in part.values() if p]
            )
            for part in parts
        ]
    )
    return lse if dims is not None else lse[0]


class _BlockLogits:
    """The logits of a block of anchors against a segment's candidates: one tile, or with Matryoshka
    prefixes one per prefix, in order (``of``)."""

    def __init__(self, anchors: dict, candidates: dict, scale: float | torch.Tensor, options: LossOptions):
        self.anchors, self.candidates, self.scale, self.options = anchors, candidates, scale, options
        self.scaled: dict[str, torch.Tensor] = {}  # anchors times the scale, made when a block first needs them
        self.inverse: dict[str, torch.Tensor] = {}  # [rows, K] prefix inverse norms, made when first needed

    def _inverse(self, key: str, x: torch.Tensor) -> torch.Tensor:
        if key not in self.inverse:
            self.inverse[key] = prefix_inverse_norms(x, self.options.matryoshka_dims)
        return self.inverse[key]

    def of(self, anchor: str, segment: str):
        x, y, scale, dims = self.anchors[anchor], self.candidates[segment], self.scale, self.options.matryoshka_dims
        if dims is None:
            if x.dtype in HALF:  # 16-bit GEMM, float32 logits; the scale after it (not rounded to 16 bits)
                yield matmul_f32(x, y.T) * scale
                return
            # The temperature scales the [n, D] anchors, not the N x M logits: no N x M pass for it,
            # forward or backward (d scale = sum(dQs * Q) over n x D).
            if anchor not in self.scaled:
                self.scaled[anchor] = x * scale
            yield self.scaled[anchor] @ y.T
            return
        raw = None
        for k, (lo, hi) in enumerate(zip((0, *dims[:-1]), dims)):
            piece = matmul_f32(x[:, lo:hi], y[:, lo:hi].T)
            raw = piece if raw is None else raw + piece
            s = raw * scale
            if self.options.normalize:
                s = s * self._inverse("anchor " + anchor, x)[:, k, None] * self._inverse(segment, y)[None, :, k]
            yield s
