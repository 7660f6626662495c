from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ._common import _cached_loss, _has_static_embedding_input, cos_sim, pair_groups
from .multiple_negatives_ranking import FusedMultipleNegativesRankingLoss


class _NoCachedLossBase:
    """Stands in for sentence-transformers' cached-loss base where sentence-transformers lacks it."""


def _cached_loss_base() -> type:
    """sentence-transformers' ``CachedLossMixin`` (so that its wrappers recognise this loss as a cached
    one, and its ``embed_minibatch`` / ``embed_minibatch_iter`` / ``forward_cached`` are there), or a
    stand-in: the module imports without sentence-transformers."""
    try:
        from sentence_transformers.base.losses.gradcache import CachedLossMixin
    except ImportError:
        return _NoCachedLossBase
    return CachedLossMixin


class FusedCachedMultipleNegativesRankingLoss(_cached_loss_base(), nn.Module):
    """sentence-transformers' ``CachedMultipleNegativesRankingLoss`` (GradCache MNRL), fused.

    The arguments, attributes, errors, config dict and citation of
    ``CachedMultipleNegativesRankingLoss``; the loss of :class:`FusedMultipleNegativesRankingLoss`
    (which it holds as ``.loss``, as the original holds an MNRL), with gradient caching from
    :class:`samtone_kernels.gradcache.GradCache`:

    1. ``forward`` embeds every column in mini-batches of ``mini_batch_size`` rows (or of about
       ``mini_batch_num_tokens`` tokens) without gradients, saving each mini-batch's RNG state;
    2. computes the loss on the whole batch and its gradient with respect to the embeddings;
    3. returns the loss; its backward (the trainer's ``loss.backward()``) re-embeds each mini-batch
       with gradients under its saved RNG state, so dropout draws the same masks, and
       backpropagates the cached gradient, scaled by the incoming one (loss scaling, gradient
       accumulation). Autocast is replayed as well.

    Parameter gradients equal those of the uncached loss with the same dropout masks; encoder memory
    is that of one mini-batch. Under ``DistributedDataParallel`` every re-embedding but the last runs
    under the model's ``no_sync``, so gradients are all-reduced once. It keeps the original's
    protocol for wrappers (``uses_gradient_cache``, ``calculate_loss(reps, labels,
    with_backward=...)``), so ``MatryoshkaLoss`` wraps it the same way.

    Args:
        model: The SentenceTransformer to train, as in :class:`FusedMultipleNegativesRankingLoss`.
        scale: As in :class:`FusedMultipleNegativesRankingLoss`. Default 20.0.
        similarity_fct: As in :class:`FusedMultipleNegativesRankingLoss` (``cos_sim`` or ``dot_score``).
        mini_batch_size: Rows per embedding mini-batch. Default 32.
        mini_batch_num_tokens: Pack mini-batches by non-padding token count instead
            (sentence-transformers' packing). Default None.
        gather_across_devices: As in :class:`FusedMultipleNegativesRankingLoss`.
        directions: As in :class:`FusedMultipleNegativesRankingLoss`. Default ``("query_to_doc",)``.
        partition_mode: As in :class:`FusedMultipleNegativesRankingLoss`. Default "joint".
        show_progress_bar: A progress bar over the embedding mini-batches. Default False.
        hardness_mode: As in :class:`FusedMultipleNegativesRankingLoss`. Default None.
        hardness_strength: As in :class:`FusedMultipleNegativesRankingLoss`. Default 0.0.

    References:
        - Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup (GradCache, Gao et al.
          2021): https://arxiv.org/abs/2101.06983

    Requirements:
        1. (anchor, positive) pairs or (anchor, positive, negative_1, ..., negative_n) tuples, no labels.
        2. A model whose inputs split into mini-batches along the batch dimension (not a StaticEmbedding).

    Example:
        ::

            from samtone_kernels.integrations.sentence_transformers import (
                FusedCachedMultipleNegativesRankingLoss as CachedMultipleNegativesRankingLoss)

            loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=32)
            trainer = SentenceTransformerTrainer(model=model, train_dataset=train_dataset, loss=loss)
            trainer.train()
    """

    uses_gradient_cache = True  # back-propagates from the returned loss's backward (MatryoshkaLoss reads this)

    _delegated_to_wrapped_loss = (
        "scale",
        "similarity_fct",
        "gather_across_devices",
        "directions",
        "partition_mode",
        "hardness_mode",
        "hardness_strength",
        "chunk_bytes",
        "mask_duplicates",
        "false_negative_margin",
    )

    def __init__(
        self,
        model: nn.Module,
        scale: float = 20.0,
        similarity_fct: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cos_sim,
        mini_batch_size: int = 32,
        mini_batch_num_tokens: int | None = None,
        gather_across_devices: bool = False,
        directions: tuple[str, ...] = ("query_to_doc",),
        partition_mode: str = "joint",
        show_progress_bar: bool = False,
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
    ) -> None:
        super().__init__()
        if _has_static_embedding_input(model):
            raise ValueError(
                "FusedCachedMultipleNegativesRankingLoss is not compatible with a SentenceTransformer model based on "
                "a StaticEmbedding, whose inputs cannot be split into mini-batches along a batch dimension. "
                "Consider using FusedMultipleNegativesRankingLoss instead."
            )
        if mini_batch_num_tokens is not None and mini_batch_num_tokens <= 0:
            raise ValueError("mini_batch_num_tokens must be a positive integer or None.")
        self.model = model
        self.loss = FusedMultipleNegativesRankingLoss(
            model,
            scale=scale,
            similarity_fct=similarity_fct,
            gather_across_devices=gather_across_devices,
            directions=directions,
            partition_mode=partition_mode,
            hardness_mode=hardness_mode,
            hardness_strength=hardness_strength,
        )
        if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be a positive integer, got {mini_batch_size!r}")
        self.mini_batch_size = mini_batch_size
        self.mini_batch_num_tokens = mini_batch_num_tokens
        self.show_progress_bar = show_progress_bar

    def __setattr__(self, name: str, value: Any) -> None:
        """Assigning a loss hyperparameter sets it on the wrapped loss, as in the original."""
        if name in self._delegated_to_wrapped_loss and isinstance(getattr(self, "loss", None), nn.Module):
            setattr(self.loss, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def scale(self) -> float:
        return self.loss.scale

    @property
    def similarity_fct(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return self.loss.similarity_fct

    @property
    def gather_across_devices(self) -> bool:
        return self.loss.gather_across_devices

    @property
    def directions(self) -> tuple[str, ...]:
        return self.loss.directions

    @property
    def partition_mode(self) -> str:
        return self.loss.partition_mode

    @property
    def hardness_mode(self) -> str | None:
        return self.loss.hardness_mode

    @property
    def hardness_strength(self) -> float:
        return self.loss.hardness_strength

    @property
    def false_negative_margin(self) -> float | None:
        """The wrapped loss's ``false_negative_margin`` (assignable, as the hyperparameters)."""
        return self.loss.false_negative_margin

    @property
    def mask_duplicates(self) -> bool:
        """The wrapped loss's ``mask_duplicates`` (assignable, as the hyperparameters)."""
        return self.loss.mask_duplicates

    @property
    def chunk_bytes(self) -> int | None:
        """The wrapped loss's ``chunk_bytes`` (assignable, as the hyperparameters)."""
        return self.loss.chunk_bytes

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    def calculate_loss(
        self,
        reps: list[list[torch.Tensor]],
        labels: torch.Tensor | None = None,
        *,
        with_backward: bool = False,
        group_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of the whole batch from per-column lists of mini-batch embeddings [m_k, D].

        With ``with_backward``, backpropagate it to ``reps`` (their ``.grad``) and return it detached:
        the protocol of sentence-transformers' cached losses, which ``MatryoshkaLoss`` decorates.
        """
        columns = [col[0] if len(col) == 1 else torch.cat(col) for col in reps]
        loss = self.loss.compute_loss_from_embeddings(columns, labels, group_ids=group_ids)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def forward(
        self, sentence_features: Iterable[dict[str, torch.Tensor]], labels: torch.Tensor | None
    ) -> torch.Tensor:
        """Loss of a batch of tokenised columns (anchor, positive, *negatives); see the class notes."""
        sentence_features = list(sentence_features)
        group_ids = pair_groups(sentence_features) if self.mask_duplicates else None
        return _cached_loss(
            self,
            sentence_features,
            labels,
            self.mini_batch_size,
            self.mini_batch_num_tokens,
            self.show_progress_bar,
            group_ids=group_ids,
        )

    def get_config_dict(self) -> dict[str, Any]:
        """CachedMultipleNegativesRankingLoss's config dict: the wrapped loss's, with the mini-batch
        keys after the similarity, in the original's order."""
        config = self.loss.get_config_dict()
        head = {key: config[key] for key in ("scale", "similarity_fct")}
        mini_batches = {"mini_batch_size": self.mini_batch_size, "mini_batch_num_tokens": self.mini_batch_num_tokens}
        return head | mini_batches | config

    @property
    def citation(self) -> str:
        return """
@misc{gao2021scaling,
    title={Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
    author={Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan},
    year={2021},
    eprint={2101.06983},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
"""
