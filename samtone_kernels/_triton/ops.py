"""Launchers and the two ``torch.library.custom_op``s (forward, backward) with fake implementations
and an autograd formula, so ``torch.compile`` traces around them.

The launches come from ``plan``: ``forward_launches`` gives the statistics' rows, ``backward_launches``
the gradients, one float32 buffer per tensor that the epilogue turns into the gradient in the
input dtype. The fakes read the same plan, so they cannot disagree with what the launchers return.
"""

from __future__ import annotations

import torch

from .. import _plan as plan
from .._contract import LossOptions, Rows
from .._rows import normalize_rows
from .configs import MARGIN_MIN_ARCH, running_arch
from .hybrid import prepare_hybrid, row_stats_hybrid
from .launch import Backward, Batch, forward, outputs


@torch.library.custom_op("samtone_kernels::row_lse", mutates_args=())
def row_lse_op(
    q: torch.Tensor,
    d: torch.Tensor,
    q_all: torch.Tensor | None,
    d_all: torch.Tensor | None,
    n_all: torch.Tensor | None,
    groups: torch.Tensor | None,
    scale: torch.Tensor,
    offset: int,
    directions: str,
    normed: bool,
    hardness: float = 0.0,
    hardness_mode: str = "",
    margin: float | None = None,
) -> torch.Tensor:
    """[A + 1, n] float32 row statistics of the anchors q, d [n, D], which are pairs
    ``offset .. offset + n - 1`` of the candidates q_all, d_all [N, D], n_all [N, H, D]: log Zq (row
    0), with d2q or d2d log Zd (row 1), and last the positive logits ``scale * q_i . d_i``.
    ``q_all = d_all = None``: the candidates are the anchors themselves (no gathered batch).
    ``directions``: the selected directions as one value (``plan.encode_directions``: "q2d,q2q").
    ``normed``: every embedding is used as its unit vector (the kernels scale logit tiles).
    ``hardness``, ``hardness_mode`` ("" for none): the q2d softmax's hardness penalty. ``margin``:
    the false-negative margin (None: off)."""
    batch = Batch(q, d, q_all, d_all, n_all, groups, offset, normed, hardness, hardness_mode, scale, margin)
    return forward(batch, plan.decode_directions(directions), scale)


@row_lse_op.register_fake
def _(
    q, d, q_all, d_all, n_all, groups, scale, offset, directions, normed, hardness=0.0, hardness_mode="", margin=None
):
    return q.new_empty(
        (len(plan.forward_launches(plan.decode_directions(directions))) + 1, q.shape[0]), dtype=torch.float32
    )


@torch.library.custom_op("samtone_kernels::row_lse_backward", mutates_args=())
def row_lse_backward_op(
    grad_stats: torch.Tensor,
    stats: torch.Tensor,
    q: torch.Tensor,
    d: torch.Tensor,
    q_all: torch.Tensor | None,
    d_all: torch.Tensor | None,
    n_all: torch.Tensor | None,
    groups: torch.Tensor | None,
    scale: torch.Tensor,
    offset: int,
    directions: str,
    normed: bool,
    hardness: float,
    hardness_mode: str,
    margin: float | None,
    want_dots: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of F = sum(grad_stats * stats), each in its input's dtype, and ``sum_X <X, dF/dX>``.

    Returns ``(dq, dd, dq_all, dd_all, dn_all, dots)``: dq, dd [n, D] the anchors' (with the
    candidates' part when ``q_all`` is None: the candidates are the anchors); dq_all, dd_all [N, D]
    and dn_all [N, H, D] the candidates'. A tensor with no role in the selected directions comes
    back with 0 rows (dn_all: H = 0). ``dots`` [] float32 is the sum over every input and role of
    <X, dF/dX> when ``want_dots`` (the temperature's gradient), else 0; with ``normed``, X are the
    unit vectors and the gradients are taken back through the normalisation (the epilogue).
    """
    batch = Batch(q, d, q_all, d_all, n_all, groups, offset, normed, hardness, hardness_mode, scale, margin)
    directions = plan.decode_directions(directions)
    backward = Backward(batch, grad_stats, stats, scale, len(plan.forward_launches(directions)), want_dots)
    grads = {
        launch.rows: backward.run(launch)
        for launch in plan.backward_launches(directions, batch.shared)
        if batch.tensor(launch.rows) is not None
    }  # without hard negatives, no launch for them
    grads["n_all"] = grads.get("n_all", grads.get("n"))
    have = outputs(batch.shared, directions)
    none = {
        name: batch.tensor(name).new_empty((0, *batch.tensor(name).shape[1:]))
        for name in ("q_all", "d_all")
        if not have[name]
    }
    dn_all = grads["n_all"] if have["n_all"] else q.new_empty((batch.n_cand, 0, batch.dim))
    return (
        grads["q"],
        grads["d"],
        grads.get("q_all", none.get("q_all")),
        grads.get("d_all", none.get("d_all")),
        dn_all,
        backward.dots,
    )


@row_lse_backward_op.register_fake
def _(
    grad_stats,
    stats,
    q,
    d,
    q_all,
    d_all,
    n_all,
    groups,
    scale,
    offset,
    directions,
    normed,
    hardness,
    hardness_mode,
    margin,
    want_dots,
):
    shared = q_all is None
    q_all, d_all = (q, d) if shared else (q_all, d_all)
    have = outputs(shared, plan.decode_directions(directions))

    def rows(x, present):
        return x.new_empty(x.shape if present else (0, *x.shape[1:]))

    dn_all = (
        n_all.new_empty(n_all.shape)
        if n_all is not None and have["n_all"]
        else q.new_empty((q_all.shape[0], 0, q.shape[1]))
    )
    return (
        rows(q, True),
        rows(d, True),
        rows(q_all, have["q_all"]),
        rows(d_all, have["d_all"]),
        dn_all,
        q.new_empty((), dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    q, d, q_all, d_all, n_all, groups, scale, offset, directions, normed, hardness, hardness_mode, margin = inputs
    ctx.save_for_backward(q, d, q_all, d_all, n_all, groups, scale, output)  # inputs and [A + 1, n] stats
    ctx.flags = (offset, directions, normed, hardness, hardness_mode, margin)


def _backward(ctx, grad_stats):
    q, d, q_all, d_all, n_all, groups, scale, stats = ctx.saved_tensors
    want_dots = ctx.needs_input_grad[6]
    *grads, dots = row_lse_backward_op(
        grad_stats.contiguous(), stats, q, d, q_all, d_all, n_all, groups, scale, *ctx.flags, want_dots
    )
    # A tensor with no role in the selected directions gets no gradient (it came back with 0 rows).
    dq, dd, dq_all, dd_all, dn_all = (
        None if x is None or gx.shape != x.shape else gx for x, gx in zip((q, d, q_all, d_all, n_all), grads)
    )
    # Homogeneity (package docstring): dF/dscale = sum_X <X, dF/dX> / (2 scale), over every input in
    # every role it plays (anchor and candidate); the op summed the dots before casting.
    dscale = (dots / (2 * scale)).to(scale.dtype) if want_dots else None
    return dq, dd, dq_all, dd_all, dn_all, None, dscale, None, None, None, None, None, None


row_lse_op.register_autograd(_backward, setup_context=_setup_context)


def normed_for(options: LossOptions, dtype: torch.dtype) -> bool:
    """Whether the kernels normalise (NORMED: they scale logit tiles by inverse norms, no copy): with
    ``normalize=True``, except for a gathered batch (its unit vectors are gathered) and float16
    (whose backward products w P / |y| could leave its range), which ``prepare_triton`` normalises
    into a copy instead."""
    return options.normalize and not options.gather_across_devices and dtype != torch.float16


def _margin_by_hybrid(options: LossOptions, x: torch.Tensor) -> bool:
    """A call with the false-negative margin on a GPU older than ``configs.MARGIN_MIN_ARCH``: the
    fused backward would spill there, so the hybrid path (the same masks) computes it."""
    return options.false_negative_margin is not None and x.is_cuda and (running_arch() or 0) < MARGIN_MIN_ARCH


def prepare_triton(embeddings: list[torch.Tensor], options: LossOptions) -> list[torch.Tensor]:
    """The Triton backend's ``prepare``: the kernels read the input dtype (tensor cores) and accumulate
    in float32, so nothing is upcast. Normalisation happens in the kernels (``normed_for``)
    or into a copy by ``normalize_rows``, which saves no float32 copy for the backward."""
    if _margin_by_hybrid(options, embeddings[0]):
        return prepare_hybrid(embeddings, options)
    if options.normalize and not normed_for(options, embeddings[0].dtype):
        return [normalize_rows(x) for x in embeddings]
    return list(embeddings)


def row_stats_triton(rows: Rows, options: LossOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton backend's ``row_stats`` (see ``samtone_kernels._backends``): the [A, n] float32
    log-partitions, and the [n] float32 positive logits ``scale * q_i . d_i`` (one op, so that their
    gradients share buffers).

    Embeddings are read in their own dtype and strides; ``rows.scale`` (1 / temperature) may be a
    float or a 0-dim tensor (its gradient is returned). When the candidates are the anchors themselves
    (``q_all is q and d_all is d``), each tensor's whole gradient comes from one launch.
    """
    q, d, q_all, d_all, scale = rows.q, rows.d, rows.q_all, rows.d_all, rows.scale
    if _margin_by_hybrid(options, q):
        return row_stats_hybrid(rows, options)
    if not isinstance(scale, torch.Tensor):
        scale = torch.full((), scale, dtype=torch.float32, device=q.device)
    if q_all is q and d_all is d:
        q_all = d_all = None
    stats = row_lse_op(
        q,
        d,
        q_all,
        d_all,
        rows.n_all,
        rows.group_ids,
        scale.float(),
        rows.offset,
        plan.encode_directions(options.directions),
        normed_for(options, q.dtype),
        options.hardness,
        options.hardness_mode or "",
        options.false_negative_margin,
    )
    return stats[:-1], stats[-1]
