"""What the sentence-transformers losses share: the names of sentence-transformers' options in this
library's terms, the similarity functions, embedding a batch's columns, duplicate groups, and the
GradCache glue of the cached losses. Nothing here imports sentence-transformers at import time."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...gradcache import GradCache

# sentence-transformers' names -> this library's
DIRECTION_NAMES = {"query_to_doc": "q2d", "query_to_query": "q2q", "doc_to_query": "d2q", "doc_to_doc": "d2d"}
PARTITION_NAMES = {"joint": "joint", "per_direction": "per_anchor"}


def cos_sim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity matrix [A, B] of [A, D] and [B, D]. The default ``similarity_fct``: the
    constructors replace it by ``sentence_transformers.util.cos_sim`` (this package does not import
    sentence-transformers at import time)."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


@functools.cache
def _st_util():
    """``sentence_transformers.util``, or None without the package (looked up once)."""
    try:
        from sentence_transformers import util
    except ImportError:
        return None
    return util


def _similarity_name(similarity_fct: Callable) -> str:
    """The name sentence-transformers' config dict gives ``similarity_fct`` (``model.similarity``
    resolves to the function it dispatches to)."""
    util = _st_util()
    if util is not None:
        return util.similarity_fct_name(similarity_fct)
    return getattr(similarity_fct, "__name__", type(similarity_fct).__name__)


def _fused_normalize(similarity_fct: Callable) -> bool:
    """``normalize`` for ``fused_samtone_loss``: True for cos_sim, False for dot_score."""
    util = _st_util()
    if similarity_fct is cos_sim or (
        util is not None and any(similarity_fct is f for f in (util.cos_sim, util.pytorch_cos_sim))
    ):
        return True
    if util is not None and similarity_fct is util.dot_score:
        return False
    name = _similarity_name(similarity_fct)
    if name in ("cos_sim", "dot_score"):
        return name == "cos_sim"
    raise ValueError(
        f"similarity_fct: {name!r} is not fused; the fused loss computes sentence_transformers.util.cos_sim "
        "(cosine similarity) and sentence_transformers.util.dot_score (dot product). Use one of those, or "
        "sentence-transformers' MultipleNegativesRankingLoss for another similarity"
    )


def embed_columns(model: nn.Module, sentence_features: Iterable[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """One embedding tensor per column: the anchors in one forward, the candidate columns (positive
    and negatives) merged into one more where they tokenise alike, as MNRL does
    (``sentence_transformers.base.losses.merged_forward.embed_columns``); one forward per column
    with a sentence-transformers that does not have it."""
    try:
        from sentence_transformers.base.losses.merged_forward import embed_columns as st_embed_columns
    except ImportError:
        return [model(features)["sentence_embedding"] for features in sentence_features]
    return st_embed_columns(model, sentence_features)


def duplicate_groups(features: dict[str, torch.Tensor]) -> torch.Tensor:
    """[N] group ids of a tokenised column: rows with identical tokens (identical texts, up to the
    model's truncation) share an id. Embeddings cannot reveal duplicates under dropout; tokens can."""
    tokens = features["input_ids"]
    if "attention_mask" in features:
        tokens = tokens * features["attention_mask"]  # padding never tells two texts apart
    return torch.unique(tokens, dim=0, return_inverse=True)[1]


def pair_groups(sentence_features: list[dict[str, torch.Tensor]]) -> torch.Tensor | None:
    """[N] group ids of the pairs of a batch of tokenised columns (anchor, positive, *negatives): pairs
    with identical anchor texts or identical positive texts, connected (``connected_groups``); None
    with fewer than two columns."""
    if len(sentence_features) < 2:
        return None
    return connected_groups(duplicate_groups(sentence_features[0]), duplicate_groups(sentence_features[1]))


def connected_groups(*groupings: torch.Tensor) -> torch.Tensor:
    """[N] group ids of the connected components of several groupings ([N] ids each): rows i and j
    share a group when some grouping puts them together, directly or through other rows (two copies
    of a query are relevant to each other, and so are the documents either one has)."""
    groupings = [torch.unique(ids, return_inverse=True)[1] for ids in groupings]  # ids in 0 .. N - 1
    label = torch.arange(groupings[0].shape[0], device=groupings[0].device)
    while True:  # each pass gives every row the smallest label of its groups; a few passes at most
        before = label
        for ids in groupings:
            smallest = torch.full_like(label, label.shape[0]).scatter_reduce(0, ids, label, "amin")
            label = torch.minimum(label, smallest[ids])
        if torch.equal(label, before):
            return torch.unique(label, return_inverse=True)[1]


# --------------------------------------------------------------------------------------------------
# GradCache glue of the cached losses
# --------------------------------------------------------------------------------------------------
def _gradcache_helpers():
    """sentence-transformers' mini-batching of tokenised features (trailing-padding trimming,
    token-budget packing, flattened and multimodal inputs), as its cached losses use it."""
    try:
        from sentence_transformers.base.losses.gradcache import _create_minibatch, _minibatch_ranges
    except ImportError as error:
        raise ImportError(
            "FusedCachedMultipleNegativesRankingLoss needs sentence-transformers' mini-batching helpers "
            "(sentence_transformers.base.losses.gradcache, sentence-transformers >= 6)"
        ) from error
    return _create_minibatch, _minibatch_ranges


def _has_static_embedding_input(model: nn.Module) -> bool:
    if not isinstance(getattr(model, "_orig_mod", model), nn.Sequential):
        return False  # not a SentenceTransformer (a stand-in encoder): nothing to check
    from sentence_transformers.base.losses.gradcache import has_static_embedding_input

    return has_static_embedding_input(model)


def _ddp_no_sync(model: nn.Module):
    model = getattr(model, "_orig_mod", model)
    return model.no_sync if isinstance(model, nn.parallel.DistributedDataParallel) else None


def _progress(show: bool, mini_batches: Iterable[Any]) -> Iterable[Any]:
    if not show:
        return mini_batches
    import tqdm

    return tqdm.tqdm(mini_batches, desc="Embed mini-batches")


def _cached_loss(
    loss: nn.Module,
    sentence_features: Iterable[dict[str, torch.Tensor]],
    labels: torch.Tensor | None,
    mini_batch_size: int,
    mini_batch_num_tokens: int | None,
    show_progress_bar: bool,
    **loss_kwargs: Any,
) -> torch.Tensor:
    """GradCache through ``loss.calculate_loss(reps, labels, with_backward=..., **loss_kwargs)`` (the
    protocol of sentence-transformers' cached losses; ``loss_kwargs``, such as ``group_ids``, are
    passed to every call): embed every column in mini-batches without gradients, backpropagate the
    loss to the embeddings, and return the loss with a surrogate term whose backward re-embeds each
    mini-batch under its saved RNG state (``GradCache``)."""
    sentence_features = list(sentence_features)
    if len(sentence_features) < 2:
        raise ValueError(f"Expected at least 2 inputs, got {len(sentence_features)}")
    create_minibatch, minibatch_ranges = _gradcache_helpers()
    # Boundaries first: modules may edit the features in place while embedding.
    ranges = [minibatch_ranges(f, mini_batch_size, mini_batch_num_tokens) for f in sentence_features]
    cache = GradCache(no_sync=_ddp_no_sync(loss.model))

    def encode(features: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss.model(features)["sentence_embedding"]

    columns = [
        cache.embed_mini_batches(
            encode, _progress(show_progress_bar, [create_minibatch(f, b, e) for b, e in column_ranges])
        )
        for f, column_ranges in zip(sentence_features, ranges)
    ]
    if not torch.is_grad_enabled():
        return loss.calculate_loss(columns, labels, **loss_kwargs)

    # Step 2 on detached copies, through calculate_loss (which a wrapper may have decorated).
    reps = [[e.detach().requires_grad_() for e in column] for column in columns]
    value = loss.calculate_loss(reps, labels, with_backward=True, **loss_kwargs)
    unused = [str(i) for i, column in enumerate(reps) if any(r.grad is None for r in column)]
    if unused:
        raise ValueError(
            f"The loss computation of {loss.__class__.__name__} did not use input column(s) {', '.join(unused)}: "
            "their embeddings received no gradient. Remove the unused column(s) from the dataset instead."
        )
    # A surrogate whose gradient with respect to the embeddings is the cached one: backward
    # sends grad_output * cached gradient to each mini-batch, which GradCache re-embeds.
    surrogate = sum(
        (e.to(dtype) * r.grad.to(dtype)).sum()  # at least float32, as sentence-transformers' replay
        for column, rep_column in zip(columns, reps)
        for e, r in zip(column, rep_column)
        for dtype in [torch.promote_types(e.dtype, torch.float32)]
    )
    return value + (surrogate - surrogate.detach()).to(value.dtype)
