"""Cross-device negatives over ``torch.distributed``: every rank's candidates, exact gradients.

With ``gather_across_devices=True`` each rank passes its local pairs; the queries, documents, hard
negatives and group ids of all ranks (in rank order) form the candidates, and the local pairs are
the anchors, pair i of rank r being candidate ``offset_r + i``. The gather is autograd-aware: the
gradient every rank computes for a gathered row is summed and handed to the rank that owns the row.

Scaling. What is gathered is the embeddings, O(W * N * D) per rank for W ranks, plus N group ids;
no logits, statistics or gradients of other ranks' anchors cross the wire in the forward. The
backward sums each gathered row's gradient over ranks with one reduce-scatter: each rank receives
only its own rows' sums, O(N * D) per rank instead of an all-reduce's O(W * N * D). Beyond that,
when the gathered W * N * D embeddings no longer fit one device, a ring exchange (as in Inf-CL)
would stream other ranks' candidate blocks instead of holding them all at once.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._constants import FLOAT_DTYPES

_DTYPES = list(FLOAT_DTYPES)  # a dtype crosses the wire as its index here
_warned_single_process = False


@dataclass
class GatheredBatch:
    """The candidates of every rank, and where this rank's anchors sit among them."""

    queries: torch.Tensor  # [N, D]
    docs: torch.Tensor  # [N, D]
    hard_negatives: torch.Tensor | None  # [N, H, D]
    group_ids: torch.Tensor | None  # [N]
    offset: int  # this rank's first pair among the N
    world_size: int
    total: int  # N, the pairs of all ranks


class _GatherRows(torch.autograd.Function):
    """All-gather of [n_r, ...] tensors of unequal n_r along dim 0, with gradients for the owner."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int, group) -> torch.Tensor:
        if x.shape[0] == max(sizes):
            padded = x.contiguous()  # equal sizes, the usual case: no padding copy
        else:
            padded = x.new_zeros((max(sizes), *x.shape[1:]))
            padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank holds d(its loss)/d(all rows); the owner of a row gets their sum over ranks. A
        # reduce-scatter delivers each rank only its own rows' sums: W times less traffic than an
        # all-reduce of every row. Its pieces have one shape, so unequal sizes are padded to the largest.
        sizes, width = ctx.sizes, max(ctx.sizes)
        grad = grad.contiguous()
        if all(size == width for size in sizes):
            pieces = list(grad.split(width))
        else:
            pieces = [grad.new_zeros((width, *grad.shape[1:])) for _ in sizes]
            for piece, part in zip(pieces, grad.split(sizes)):
                piece[: part.shape[0]] = part
        mine = grad.new_empty((width, *grad.shape[1:]))
        dist.reduce_scatter(mine, pieces, op=dist.ReduceOp.SUM, group=ctx.group)
        return mine[: sizes[ctx.rank]], None, None, None


def _check_consistent(metas: list[list[int]]) -> None:
    """Every rank must agree on D, H, dtype and whether group ids are given (all raise alike)."""
    fields = [
        (1, "queries", "embedding dimension D"),
        (2, "hard_negatives", "number of hard negatives H"),
        (3, "group_ids", "presence of group ids (1 = given)"),
        (4, "queries", "dtype"),
    ]
    for index, name, what in fields:
        values = [m[index] for m in metas]
        if len(set(values)) > 1:
            if index == 4:
                values = [str(_DTYPES[v]).replace("torch.", "") for v in values]
            raise ValueError(
                f"{name}: ranks disagree on the {what}: {values} (rank order); "
                "gather_across_devices needs the same on every rank"
            )


def gather_batch(
    q: torch.Tensor, d: torch.Tensor, n: torch.Tensor | None, group_ids: torch.Tensor | None, process_group=None
) -> GatheredBatch:
    """Gather the candidates of every rank of ``process_group`` (default: the world).

    Without an initialised process group this is the single-process batch (and says so once).
    """
    global _warned_single_process
    if not (dist.is_available() and dist.is_initialized()):
        if not _warned_single_process:
            warnings.warn(
                "gather_across_devices=True without an initialised torch.distributed process group: "
                "computing the single-process loss",
                stacklevel=3,
            )
            _warned_single_process = True
        return GatheredBatch(q, d, n, group_ids, 0, 1, q.shape[0])

    world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    n_hard = 0 if n is None else n.shape[1]
    meta = torch.tensor(
        [q.shape[0], q.shape[1], n_hard, int(group_ids is not None), _DTYPES.index(q.dtype)],
        dtype=torch.int64,
        device=q.device,
    )
    metas = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(metas, meta, group=process_group)
    metas = [m.tolist() for m in metas]  # one small host sync: the sizes shape everything below
    _check_consistent(metas)
    sizes = [m[0] for m in metas]

    def gather(x):
        return None if x is None else _GatherRows.apply(x, sizes, rank, process_group)

    return GatheredBatch(gather(q), gather(d), gather(n), gather(group_ids), sum(sizes[:rank]), world, sum(sizes))
