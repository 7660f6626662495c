"""Public entry point: ``fused_samtone_loss``.

Every backend (``_backends.REGISTRY``, over the contract of ``_contract``) computes the per-anchor
log-partitions ``lse`` [A, N] and the positive logits [N] (the fused backend in one op, so that their
gradients share its buffers); the partition, the non-finite check and the reduction are assembled
here once, in torch, so all backends share those semantics exactly. ``backend="auto"`` on a GPU is
chosen by measurement (``_choice``).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Sequence

import torch

from . import _choice, _own
from ._backends import REGISTRY, check_backend_name, resolve_backend, triton_available
from ._contract import LossOptions, Rows
from ._options import check_inputs, check_matryoshka_dim, check_options, check_temperature
from .distributed import gather_batch

__all__ = ["fused_samtone_loss", "triton_available"]


def _temperature_scale(temperature: float | torch.Tensor, dtype: torch.dtype, device: torch.device):
    """1 / temperature. A tensor that is not > 0 and finite gives NaN (its value is never read)."""
    if not isinstance(temperature, torch.Tensor):
        return 1.0 / temperature
    tau = temperature.to(device=device, dtype=dtype)
    valid = torch.isfinite(tau) & (tau > 0)
    return torch.where(valid, 1.0 / tau, torch.full_like(tau, float("nan")))


def _assemble(lse: torch.Tensor, pos: torch.Tensor, options: LossOptions) -> torch.Tensor:
    """Per-pair losses [N] from the log-partitions [A, N] and the positive logits [N]."""
    if not options.doc_anchor:
        return lse[0] - pos
    if options.partition == "joint":
        return torch.logaddexp(lse[0], lse[1]) - pos
    w = options.doc_anchor_weight
    return ((lse[0] - pos) + w * (lse[1] - pos)) / (1.0 + w)


def fused_samtone_loss(
    queries: torch.Tensor,
    docs: torch.Tensor,
    hard_negatives: torch.Tensor | None = None,
    *,
    temperature: float | torch.Tensor = 0.05,
    directions: Sequence[str] = ("q2d", "q2q"),
    partition: str = "per_anchor",
    doc_anchor_weight: float = 1.0,
    group_ids: torch.Tensor | None = None,
    normalize: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
    gather_across_devices: bool = False,
    process_group: torch.distributed.ProcessGroup | None = None,
    hardness_mode: str | None = None,
    hardness_strength: float = 0.0,
    chunk_bytes: int | None = None,
    false_negative_margin: float | None = None,
    hard_negative_scope: str = "shared",
    matryoshka_dims: Sequence[int] | None = None,
    matryoshka_weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """In-batch contrastive loss with same-tower negatives (SamToNe) and its relatives.

    Parameters
    ----------
    queries : [N, D] tensor
        Query-tower embeddings; ``queries[i]`` is paired with ``docs[i]``.
    docs : [N, D] tensor
        Document-tower embeddings, the positives.
    hard_negatives : [N, H, D] tensor, optional
        ``hard_negatives[i, h]`` is a mined negative of query i. Column (j, k) of the document
        candidates is ``docs[j]`` for k = 0 and ``hard_negatives[j, k - 1]`` for k >= 1.
    temperature : float or 0-dim tensor, default 0.05
        Logits are ``x . y / temperature``. A tensor may require grad (a learnable temperature).
    directions : sequence of {"q2d", "q2q", "d2q", "d2d"}, default ("q2d", "q2q")
        "q2d": query i against every document column; "q2q": against every other query (SamToNe);
        "d2q": document i against every query (DANCE); "d2d": document i against every document
        column except those of pair i. "q2d" is required; "d2d" without "d2q" needs
        ``partition="joint"`` (a document's own softmax holds its positive only through "d2q").
    partition : {"per_anchor", "joint"}, default "per_anchor"
        "per_anchor": ``l_i = [(log Zq_i - pos_i) + w (log Zd_i - pos_i)] / (1 + w)`` (just
        ``log Zq_i - pos_i`` without "d2q"); "joint": ``l_i = log(Zq_i + Zd_i) - pos_i`` (GTE).
    doc_anchor_weight : float, default 1.0
        ``w`` above (DANCE uses 0.1). Must be 1.0 with ``partition="joint"``; unused without "d2q".
    group_ids : [N] integer tensor, optional
        Pairs with equal ids are relevant to each other and never negatives of one another: for
        anchor i and j != i in its group, column (j, 0) leaves q2d and d2d, and q_j leaves q2q and
        d2q. Hard negatives are never removed. Moved to the embeddings' device if needed.
    normalize : bool, default False
        L2-normalise every embedding first (``x / max(|x|, 1e-12)``: cosine similarity): the usual
        choice with temperatures of 0.01 to 0.1, since the logits are then bounded by 1 /
        temperature. Without it the logits are raw dot products / temperature, right only for
        embeddings that are unit vectors already or a temperature chosen for their norms (64 random
        standard-normal pairs of dimension 64 at 0.05: a loss of 421 without it, 7.7 with it).
    reduction : {"mean", "sum", "none"}, default "mean"
        "none" returns the [N] per-pair losses.
    backend : {"auto", "triton", "hybrid", "torch"}, default "auto"
        "triton": the fused kernel; "hybrid": GEMMs by torch (cuBLAS on a GPU) into float32 logit
        chunks and Triton kernels for the elementwise steps; "torch": eager torch (every device and
        dtype). "auto": on CUDA tensors with triton (and not float64), the faster of "triton" and
        "hybrid" measured on the first call of each shape and option set, once they are checked
        to agree (``samtone_kernels.backend_choices()``; ``SAMTONE_BACKEND`` pins it); else
        "torch".
    gather_across_devices : bool, default False
        Use every rank's queries, documents and hard negatives as candidates (torch.distributed;
        see ``samtone_kernels.distributed``). Each rank passes its local pairs, which are its anchors;
        group ids are global. The reduced loss is scaled so that DDP's average of the ranks'
        gradients equals single-process training on the concatenated batch of N pairs: "mean" is
        ``W / N * sum of the local l_i`` (the local mean when every rank holds N / W pairs), "sum"
        is ``W * sum of the local l_i``; "none" returns the local l_i. Without an initialised
        process group the loss is the single-process one (with a warning, once).
    process_group : ProcessGroup, optional
        The group to gather over (default: the world).
    hardness_mode : {None, "in_batch_negatives", "hard_negatives", "all_negatives"}, default None
        Hardness weighting as in sentence-transformers' MultipleNegativesRankingLoss: inside the
        q2d softmax, ``hardness_strength * stop_grad(x . y)`` (the raw similarity, cosine with
        ``normalize=True``, not divided by the temperature) is added to the logits of the other
        pairs' columns ("in_batch_negatives"), of the query's own hard negatives
        ("hard_negatives"), or of every column but its positive ("all_negatives"). It changes the
        softmax weights, not the gradient path. Other directions are unchanged.
    hardness_strength : float, default 0.0
        The penalty's alpha (>= 0); ignored without ``hardness_mode``.
    chunk_bytes : int, optional
        Memory budget, in bytes, of one chunk of materialised logits in the backends that
        materialise them ("torch", "hybrid"): anchors go in row chunks that fit it. Default: 1 GiB.
        The fused kernel materialises none and ignores it.
    false_negative_margin : float, optional
        Drop presumed false negatives by similarity: a candidate other than the anchor's own
        positive leaves the anchor's softmax when its raw similarity to the anchor (the dot
        product, cosine with ``normalize=True``, not divided by the temperature) exceeds the pair's
        positive similarity ``q_i . d_i`` plus this margin, in every block (hard negatives too).
        A mask (no gradient through the comparison); composes with groups and hardness. None
        (default): off. NaN or infinite: ``ValueError``.
    hard_negative_scope : {"shared", "own"}, default "shared"
        Who sees ``hard_negatives[i]``. "shared" (sentence-transformers' layout): every query, as
        columns of q2d, and every document anchor, in d2d. "own": query i alone (the layout of
        recipes that give each query its own mined negatives); the other anchors see in-batch
        candidates only. "own" costs N x H logits where "shared" costs N x N H. Without hard
        negatives it changes nothing (a warning says so).
    matryoshka_dims : sequence of int, optional
        Matryoshka training (Kusupati et al. 2022): the loss is the weighted sum over these prefix
        dimensions m of the loss of ``x[..., :m]`` for every embedding, each prefix a whole loss of its
        own (normalised on its own with ``normalize=True``; every other option as for the full loss).
        Strictly increasing, the last equal to D. ``reduction="none"`` returns the per-pair sums.
        The torch and hybrid backends compute every prefix's logits as running sums of one GEMM per
        slice of D (about the matmul work of the full-D loss alone); the fused kernel computes each
        prefix apart (sum_k m_k / D of it), so "auto" on a GPU measures the hybrid and torch backends
        only. None (default): off.
    matryoshka_weights : sequence of float, optional
        One weight >= 0 per prefix (default: all 1).

    Returns
    -------
    Tensor
        float32 (float64 for float64 inputs): a scalar, or [N] for ``reduction="none"``. Gradients
        reach queries, docs, hard_negatives and a tensor temperature, in their own dtypes.

    Notes
    -----
    ``reference.samtone_loss`` (NumPy, float64) is the executable definition of these semantics. NaN
    or inf anywhere in the embeddings gives a NaN loss.
    """
    options = check_options(
        directions=directions,
        partition=partition,
        doc_anchor_weight=doc_anchor_weight,
        normalize=normalize,
        reduction=reduction,
        hardness_mode=hardness_mode,
        hardness_strength=hardness_strength,
        gather_across_devices=gather_across_devices,
        chunk_bytes=chunk_bytes,
        false_negative_margin=false_negative_margin,
        hard_negative_scope=hard_negative_scope,
        matryoshka_dims=matryoshka_dims,
        matryoshka_weights=matryoshka_weights,
    )
    tau = check_temperature(temperature)
    group_ids = check_inputs(queries, docs, hard_negatives, group_ids)
    check_matryoshka_dim(options, queries.shape[1])
    if process_group is not None and not options.gather_across_devices:
        warnings.warn("process_group has no effect without gather_across_devices=True", UserWarning, stacklevel=2)
    if (
        options.hardness_mode == "hard_negatives"
        and options.hardness
        and (hard_negatives is None or hard_negatives.shape[1] == 0)
    ):
        warnings.warn("hardness_mode='hard_negatives' has no effect without hard negatives", UserWarning, stacklevel=2)
    if options.hard_negative_scope == "own" and (hard_negatives is None or hard_negatives.shape[1] == 0):
        warnings.warn("hard_negative_scope='own' has no effect without hard negatives", UserWarning, stacklevel=2)
    paths = _choice.measured_paths(queries) if check_backend_name(backend) == "auto" else []
    if paths and options.matryoshka_dims is not None:
        # The paths that compute every prefix in one pass: the hybrid one and the eager backend (the
        # fused kernel takes each prefix apart, about 1.9x the matmul work); the GPU says which is faster.
        paths = [name for name in paths if REGISTRY[name].prefixes] + ["torch"]
    if paths:
        # The faster GPU path for this call's key, measured once (on detached copies, in one process).
        measured = functools.partial(
            fused_samtone_loss,
            temperature=tau.detach() if isinstance(tau, torch.Tensor) else tau,
            directions=options.directions,
            partition=options.partition,
            doc_anchor_weight=options.doc_anchor_weight,
            group_ids=group_ids,
            normalize=options.normalize,
            reduction=options.reduction,
            hardness_mode=options.hardness_mode,
            hardness_strength=options.hardness_strength,
            chunk_bytes=options.chunk_bytes,
            false_negative_margin=options.false_negative_margin,
            hard_negative_scope=options.hard_negative_scope,
            matryoshka_dims=options.matryoshka_dims,
            matryoshka_weights=options.matryoshka_weights,
        )
        backend = _choice.choose(paths, (queries, docs, hard_negatives), group_ids, options, measured)
    backend = resolve_backend(backend, queries)
    if hard_negatives is not None and hard_negatives.shape[1] == 0:
        hard_negatives = None

    compute_dtype = torch.float64 if queries.dtype == torch.float64 else torch.float32
    scale = _temperature_scale(tau, compute_dtype, queries.device)
    # Own hard negatives are no candidates of the backend's blocks: they join the queries' softmax
    # after it, as a per-row segment (``_own``).
    own = hard_negatives if options.hard_negative_scope == "own" else None
    if own is not None:
        hard_negatives = None

    def statistics(q_in, d_in, n_in, options):
        """(lse, pos, rows, world, total) of the backend on these embeddings."""
        embeddings = [q_in, d_in] if n_in is None else [q_in, d_in, n_in]
        q, d, n = backend.prepare(embeddings, options) + [None] * (3 - len(embeddings))
        if options.gather_across_devices:
            batch = gather_batch(q, d, n, group_ids, process_group)
            rows = Rows(q, d, batch.queries, batch.docs, batch.hard_negatives, scale, batch.group_ids, batch.offset)
            return (*backend.row_stats(rows, options), rows, batch.world_size, batch.total)
        rows = Rows(q, d, q, d, n, scale, group_ids)
        return (*backend.row_stats(rows, options), rows, 1, q.shape[0])

    def prefix(x, m):
        return None if x is None else x[..., :m]

    if options.matryoshka_dims is None:
        lse, pos, rows, world, total = statistics(queries, docs, hard_negatives, options)
        prefixes = [(lse, pos, queries, own, 1.0)]
    elif backend.prefixes:  # every prefix from running sums of one GEMM per slice of D
        lse, pos, rows, world, total = statistics(queries, docs, hard_negatives, options)
        prefixes = [
            (lse[k], pos[k], queries[:, :m], prefix(own, m), w)
            for k, (m, w) in enumerate(zip(options.matryoshka_dims, options.matryoshka_weights))
        ]
    else:  # the fused kernels: each prefix a loss of its own
        plain = dataclasses.replace(options, matryoshka_dims=None, matryoshka_weights=None)
        prefixes = []
        for m, w in zip(options.matryoshka_dims, options.matryoshka_weights):
            lse, pos, rows, world, total = statistics(queries[:, :m], docs[:, :m], prefix(hard_negatives, m), plain)
            prefixes.append((lse, pos, queries[:, :m], prefix(own, m), w))
    losses = None
    for lse, pos, q_in, own_in, weight in prefixes:
        if own_in is not None:
            lse = _own.add_own_negatives(lse, pos, q_in, own_in, scale, options)
        prefix_losses = _assemble(lse, pos, options)
        # Every l_i >= 0 (the positive is in each of its softmaxes); rounding can leave -1e-7 where
        # the positive is alone. Such a value becomes an exact 0, its gradient kept.
        prefix_losses = torch.where(prefix_losses < 0, prefix_losses - prefix_losses.detach(), prefix_losses)
        weighted = prefix_losses if weight == 1.0 else weight * prefix_losses
        losses = weighted if losses is None else losses + weighted

    # inf in an embedding can leave some rows finite (inf - inf is NaN, but inf - x is inf); the
    # contract is a NaN loss for any non-finite input, so say so explicitly (no host sync). Every
    # candidate counts, another rank's too.
    candidates = [rows.q_all, rows.d_all] + [x for x in (rows.n_all, own) if x is not None]
    finite = torch.stack([torch.isfinite(x).all() for x in candidates]).all()
    losses = torch.where(finite, losses, torch.full_like(losses, float("nan")))

    if options.reduction == "none":
        return losses
    if world == 1:
        return losses.mean() if options.reduction == "mean" else losses.sum()
    # DDP averages gradients over the W ranks: scale so that average is the single-process gradient.
    return losses.sum() * (world / total if options.reduction == "mean" else world)
