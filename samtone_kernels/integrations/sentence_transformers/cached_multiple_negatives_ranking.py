from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from ...gradcache import _AutocastState
from ._common import _ddp_no_sync, _gradcache_helpers, _has_static_embedding_input, cos_sim, pair_groups
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


class _ReplayMiniBatches(torch.autograd.Function):
    """Identity on the whole batch's loss (computed, and backpropagated to the embeddings, in the
    forward) whose backward is step 3: ``replay(grad_output)`` re-embeds every mini-batch and
    backpropagates its cached gradient. ``token`` is an empty tensor that requires grad, so the
    output is part of the graph although the loss was computed on detached embeddings; it never
    receives a gradient."""

    @staticmethod
    def forward(ctx, token: torch.Tensor, value: torch.Tensor, replay: Callable[[torch.Tensor], None]) -> torch.Tensor:
        ctx.replay = replay
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        ctx.replay(grad_output)
        return None, None, None


class FusedCachedMultipleNegativesRankingLoss(_cached_loss_base(), nn.Module):
    """sentence-transformers' ``CachedMultipleNegativesRankingLoss`` (GradCache MNRL), fused.

    The arguments, attributes, errors, config dict and citation of
    ``CachedMultipleNegativesRankingLoss``; the loss of :class:`FusedMultipleNegativesRankingLoss`
    (which it holds as ``.loss``, as the original holds an MNRL), with gradient caching
    (GradCache) through sentence-transformers' cached-loss base, ``CachedLossMixin``:

    1. ``forward`` embeds every column in mini-batches of ``mini_batch_size`` rows (or of about
       ``mini_batch_num_tokens`` tokens) without gradients, each through the inherited
       ``embed_minibatch`` (by way of ``embed_minibatch_iter``), which saves the mini-batch's RNG
       state;
    2. computes the loss on the whole batch and its gradient with respect to the embeddings
       (through ``calculate_loss(reps, labels, with_backward=True)``);
    3. returns the loss; its backward (the trainer's ``loss.backward()``) re-embeds the mini-batches
       in the order of step 1 (the columns in order, each mini-batch in order), again through
       ``embed_minibatch``, with gradients, under each one's saved RNG state, so dropout draws the
       same masks, and backpropagates the cached gradient, scaled by the incoming one (loss scaling,
       gradient accumulation).

    As in the original, then, a spy on ``embed_minibatch`` sees every mini-batch twice, in the same
    order: without gradients in ``forward``, with gradients in the backward. Unlike the original,
    the re-embedding runs under the autocast state of step 1 (``loss.backward()`` normally runs
    outside ``torch.autocast``; a replay at another precision would put the cached gradients at the
    wrong point), and the loss is float32 under 16-bit autocast (the original's follows the
    embeddings' dtype). ``forward_cached`` is this forward (without the check of the column count).

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
        "hard_negative_scope",
        "matryoshka_dims",
        "matryoshka_weights",
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
    def matryoshka_dims(self) -> tuple[int, ...] | None:
        """The wrapped loss's ``matryoshka_dims`` (assignable, as the hyperparameters)."""
        return self.loss.matryoshka_dims

    @property
    def matryoshka_weights(self) -> tuple[float, ...] | None:
        """The wrapped loss's ``matryoshka_weights`` (assignable, as the hyperparameters)."""
        return self.loss.matryoshka_weights

    @property
    def hard_negative_scope(self) -> str:
        """The wrapped loss's ``hard_negative_scope`` (assignable, as the hyperparameters)."""
        return self.loss.hard_negative_scope

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
        if len(sentence_features) < 2:
            raise ValueError(f"Expected at least 2 inputs, got {len(sentence_features)}")
        return self.forward_cached(sentence_features, labels)

    def forward_cached(
        self, sentence_features: Iterable[dict[str, torch.Tensor]], labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Steps 1 and 2 of the class notes; the returned loss's backward is step 3 (``_replay``).
        Without gradients (evaluation): the mini-batches' embeddings and the loss, nothing saved."""
        sentence_features = list(sentence_features)
        _, minibatch_ranges = _gradcache_helpers()  # ImportError, saying what it needs, without them
        group_ids = pair_groups(sentence_features) if self.mask_duplicates else None
        # Boundaries first: modules may edit the features in place while embedding, and step 3 must
        # replay step 1's mini-batches.
        ranges = [
            minibatch_ranges(feature, self.mini_batch_size, self.mini_batch_num_tokens) for feature in sentence_features
        ]
        grad_enabled = torch.is_grad_enabled()
        reps, random_states = [], []
        for feature, column_ranges in zip(sentence_features, ranges):
            column, states = [], []
            for reps_mb, random_state in self.embed_minibatch_iter(
                sentence_feature=feature, with_grad=False, copy_random_state=grad_enabled, ranges=column_ranges
            ):
                column.append(reps_mb.detach().requires_grad_() if grad_enabled else reps_mb)
                states.append(random_state)
            reps.append(column)
            random_states.append(states)
        if not grad_enabled:
            return self.calculate_loss(reps, labels, group_ids=group_ids)

        # Step 2 through calculate_loss (which a wrapper may have decorated): the cached gradients.
        value = self.calculate_loss(reps, labels, with_backward=True, group_ids=group_ids)
        unused = [str(index) for index, column in enumerate(reps) if any(r.grad is None for r in column)]
        if unused:
            raise ValueError(
                f"The loss computation of {self.__class__.__name__} did not use input column(s) {', '.join(unused)}: "
                "their embeddings received no gradient. Every input column is embedded (twice, with gradient "
                "caching), so remove the unused column(s) from the dataset instead."
            )
        replay = functools.partial(
            self._replay,
            sentence_features=sentence_features,
            ranges=ranges,
            random_states=random_states,
            cache=[[r.grad for r in column] for column in reps],
            autocast=_AutocastState(),
        )
        token = torch.empty(0, device=value.device, requires_grad=True)
        return _ReplayMiniBatches.apply(token, value.detach(), replay)

    def _replay(
        self,
        grad_output: torch.Tensor,
        *,
        sentence_features: list[dict[str, torch.Tensor]],
        ranges: list[list[tuple[int, int]]],
        random_states: list[list[Any]],
        cache: list[list[torch.Tensor]],
        autocast: _AutocastState,
    ) -> None:
        """Step 3: re-embed each mini-batch through ``embed_minibatch_iter`` in step 1's order, with
        gradients, under its saved RNG state and step 1's autocast, and backpropagate its cached
        gradient times ``grad_output``. Every mini-batch but the last runs under DDP's ``no_sync``."""
        no_sync = _ddp_no_sync(self.model)
        remaining = sum(len(column) for column in cache)
        with torch.enable_grad():
            for feature, column_ranges, states, grads in zip(sentence_features, ranges, random_states, cache):
                mini_batches = self.embed_minibatch_iter(
                    sentence_feature=feature,
                    with_grad=True,
                    copy_random_state=False,
                    random_states=states,
                    ranges=column_ranges,
                )
                for grad in grads:
                    remaining -= 1
                    with nullcontext() if no_sync is None or remaining == 0 else no_sync():
                        with autocast.restored():
                            reps_mb, *_ = next(mini_batches)
                        if reps_mb.shape != grad.shape:
                            raise RuntimeError(
                                f"embed_minibatch returned shape {tuple(reps_mb.shape)} when re-embedding a "
                                f"mini-batch that gave {tuple(grad.shape)} in the forward; gradient caching "
                                "needs the same forward twice"
                            )
                        if not reps_mb.requires_grad:  # a frozen model has nothing to backpropagate into
                            continue
                        # The cached gradient times grad_output in at least float32, as sentence-transformers'
                        # replay computes it, then in the embeddings' dtype.
                        dtype = torch.promote_types(reps_mb.dtype, torch.float32)
                        step = grad.to(dtype) * grad_output.to(dtype)
                        torch.autograd.backward(reps_mb, step.to(reps_mb.dtype))

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
