from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ... import fused_samtone_loss
from ..._backends import check_backend_here
from ..._options import check_options, check_temperature
from ._common import DIRECTION_NAMES, _cached_loss, duplicate_groups, embed_columns, pair_groups


class SamToNeRankingLoss(nn.Module):
    """In-batch contrastive loss with same-tower negatives (SamToNe), for ``SentenceTransformerTrainer``.

    For each anchor (the query), its positive (the document) must be more similar than every other
    document of the batch ("q2d") and, with SamToNe's same-tower negatives, than every other query
    ("q2q"). "d2q" and "d2d" add the document-side terms. Optional negative columns are hard
    negatives of their own anchor. The loss is ``samtone_kernels.fused_samtone_loss``, which never
    materialises the [N, M] similarity matrices (see it for the options).

    This is the sentence-transformers loss of this library, in its own terms (``temperature``,
    "q2d"-style directions). For the core module, which takes embeddings rather than tokenised
    columns, use ``samtone_kernels.SamToNeLoss``.

    Args:
        model: The SentenceTransformer to train; its ``"sentence_embedding"`` output is used.
        temperature: Logits are similarities divided by it (cosine similarities with
            ``normalize=True``); MultipleNegativesRankingLoss's ``scale`` is ``1 / temperature``.
            Default 0.05.
        directions: Names from "q2d", "q2q", "d2q", "d2d"; sentence-transformers' names
            ("query_to_doc", ...) are accepted too. The default ("q2d", "q2q") is SamToNe;
            ("q2d",) is MultipleNegativesRankingLoss.
        partition: "per_anchor" (default) or "joint", as in ``fused_samtone_loss``.
        doc_anchor_weight: Weight of the document anchors' terms, as in ``fused_samtone_loss``.
        normalize: Cosine similarity (True, default, as sentence-transformers' ``cos_sim``) or the
            dot product. ``fused_samtone_loss`` defaults to False.
        gather_across_devices: Every rank's embeddings are candidates.
        mask_duplicates: Pairs whose anchor texts are identical or whose positive texts are
            identical share a group id (the connected components of both relations), so a repeated
            query is never a same-tower negative of its copy (cosine 1), and each copy's documents
            are never negatives of the other; a repeated document is never a negative of the other
            query that has it (the doc-doc ablation of the SamToNe paper). Default True. Identity
            is read off the tokens (embeddings cannot show duplicates under dropout), so texts that
            differ only in what the tokenizer keeps count as identical, and near-duplicates do not:
            pass ``group_ids`` to ``compute_loss_from_embeddings`` for those. Only ``forward`` sees
            the tokens.
        mask_duplicate_positives: With ``mask_duplicates=False``: group identical positive texts
            only (this loss's earlier option; ``mask_duplicates`` covers it).
        backend: "auto" (default), "torch" or "triton".
        hardness_mode: Hardness weighting, as in ``fused_samtone_loss``; None (default) for none.
        hardness_strength: Its strength, as in ``fused_samtone_loss``.
        mini_batch_size: Cached (GradCache) training, as ``FusedCachedMultipleNegativesRankingLoss``:
            the columns are embedded in mini-batches of this many rows without gradients, and
            re-embedded one mini-batch at a time in backward (same RNG state: dropout replays), so
            the encoder's memory is that of one mini-batch. None (default): uncached.
        mini_batch_num_tokens: With ``mini_batch_size``: pack mini-batches by non-padding token
            count instead.
        chunk_bytes: Memory budget of one chunk of materialised logits (the "torch" and "hybrid"
            backends), as in ``fused_samtone_loss``. None (default): 1 GiB.
        false_negative_margin: Drop presumed false negatives: a candidate more similar to the anchor
            than its positive by more than this (cosine with ``normalize=True``), as in
            ``fused_samtone_loss``. None (default): off.
        hard_negative_scope: "shared" (default): every anchor sees every row's negative columns, as
            in sentence-transformers; "own": the negatives of row i are candidates of anchor i
            only, as in ``fused_samtone_loss``.
        matryoshka_dims: Matryoshka prefixes, strictly increasing, the last the model's dimension:
            the weighted sum of every prefix's loss in one call, what
            ``MatryoshkaLoss(model, loss, matryoshka_dims[::-1])`` computes by calling the loss once
            per prefix. None (default): off.
        matryoshka_weights: One weight per prefix (default: all 1).

    References:
        - SamToNe: Improving Contrastive Loss for Dual Encoder Retrieval Models with Same Tower
          Negatives (Moiseev et al., Findings of ACL 2023): https://doi.org/10.18653/v1/2023.findings-acl.761

    Requirements:
        1. (anchor, positive) pairs or (anchor, positive, negative_1, ..., negative_n) tuples, no labels.

    Relations:
        - The fused loss removes the N x M logit matrices; ``mini_batch_size`` bounds the other cost,
          the encoder's activations. In a loop of your own, embed with
          ``samtone_kernels.gradcache.GradCache`` and call ``compute_loss_from_embeddings``.

    Example:
        ::

            from datasets import Dataset
            from sentence_transformers import SentenceTransformerTrainer
            from samtone_kernels.integrations.sentence_transformers import SamToNeRankingLoss

            train_dataset = Dataset.from_dict({
                "anchor": ["reverse a list", "join two paths"],
                "positive": ["xs[::-1]", "os.path.join(a, b)"],
            })
            loss = SamToNeRankingLoss(model, temperature=0.05, directions=("q2d", "q2q"),
                                      mask_duplicate_positives=True)
            trainer = SentenceTransformerTrainer(model=model, train_dataset=train_dataset, loss=loss)
            trainer.train()
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        temperature: float = 0.05,
        directions: Sequence[str] = ("q2d", "q2q"),
        partition: str = "per_anchor",
        doc_anchor_weight: float = 1.0,
        normalize: bool = True,
        gather_across_devices: bool = False,
        mask_duplicates: bool = True,
        mask_duplicate_positives: bool = False,
        backend: str = "auto",
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
        mini_batch_size: int | None = None,
        mini_batch_num_tokens: int | None = None,
        chunk_bytes: int | None = None,
        false_negative_margin: float | None = None,
        hard_negative_scope: str = "shared",
        matryoshka_dims: Sequence[int] | None = None,
        matryoshka_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(directions, str) and isinstance(directions, Sequence):
            directions = tuple(DIRECTION_NAMES.get(name, name) for name in directions)  # long names too
        options = check_options(
            directions=directions,
            partition=partition,
            doc_anchor_weight=doc_anchor_weight,
            normalize=normalize,
            reduction="mean",
            hardness_mode=hardness_mode,
            hardness_strength=hardness_strength,
            gather_across_devices=gather_across_devices,
            chunk_bytes=chunk_bytes,
            false_negative_margin=false_negative_margin,
            hard_negative_scope=hard_negative_scope,
            matryoshka_dims=matryoshka_dims,
            matryoshka_weights=matryoshka_weights,
        )
        for name, value in (("mini_batch_size", mini_batch_size), ("mini_batch_num_tokens", mini_batch_num_tokens)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: expected an int >= 1 or None, got {value!r}")
        if mini_batch_num_tokens is not None and mini_batch_size is None:
            raise ValueError("mini_batch_num_tokens: needs mini_batch_size (cached training)")
        self.hardness_mode = options.hardness_mode
        self.hardness_strength = options.hardness_strength
        self.chunk_bytes = options.chunk_bytes
        self.false_negative_margin = options.false_negative_margin
        self.hard_negative_scope = options.hard_negative_scope
        self.matryoshka_dims = options.matryoshka_dims
        self.matryoshka_weights = options.matryoshka_weights
        self.mini_batch_size = mini_batch_size
        self.mini_batch_num_tokens = mini_batch_num_tokens
        if isinstance(temperature, torch.Tensor):
            raise TypeError("temperature: expected a float")
        self.temperature = float(check_temperature(temperature))
        self.model = model
        self.directions = options.directions
        self.partition = options.partition
        self.doc_anchor_weight = options.doc_anchor_weight
        self.normalize = options.normalize
        self.backend = check_backend_here(backend)
        for name, value in (
            ("mask_duplicates", mask_duplicates),
            ("mask_duplicate_positives", mask_duplicate_positives),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
        self.mask_duplicates = mask_duplicates
        self.gather_across_devices = options.gather_across_devices
        self.mask_duplicate_positives = mask_duplicate_positives

    def forward(
        self, sentence_features: Iterable[dict[str, torch.Tensor]], labels: torch.Tensor | None
    ) -> torch.Tensor:
        """Loss of a batch of tokenised columns (anchor, positive, *negatives); cached with
        ``mini_batch_size``."""
        if isinstance(sentence_features, torch.Tensor):
            raise TypeError(
                "SamToNeRankingLoss takes tokenised columns (a list of feature dicts: anchor, positive, "
                f"*negatives), as SentenceTransformerTrainer passes them, got a {type(sentence_features).__name__}; "
                "samtone_kernels.SamToNeLoss takes embeddings: SamToNeLoss(...)(queries, docs)"
            )
        sentence_features = list(sentence_features)
        group_ids = None
        if self.mask_duplicates:
            group_ids = pair_groups(sentence_features)
        elif len(sentence_features) >= 2 and self.mask_duplicate_positives:
            group_ids = duplicate_groups(sentence_features[1])
        if self.mini_batch_size is not None:
            return _cached_loss(
                self,
                sentence_features,
                labels,
                self.mini_batch_size,
                self.mini_batch_num_tokens,
                show_progress_bar=False,
                group_ids=group_ids,
            )
        embeddings = embed_columns(self.model, sentence_features)  # candidate columns merged, as MNRL
        return self.compute_loss_from_embeddings(embeddings, labels, group_ids=group_ids)

    @property
    def uses_gradient_cache(self) -> bool:
        """Cached training backpropagates from the returned loss's backward (wrappers read this)."""
        return self.mini_batch_size is not None

    def calculate_loss(
        self,
        reps: list[list[torch.Tensor]],
        labels: torch.Tensor | None = None,
        *,
        with_backward: bool = False,
        group_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss from per-column lists of mini-batch embeddings [m_k, D] (cached training); with
        ``with_backward``, backpropagated to ``reps`` and returned detached."""
        columns = [col[0] if len(col) == 1 else torch.cat(col) for col in reps]
        loss = self.compute_loss_from_embeddings(columns, labels, group_ids=group_ids)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def compute_loss_from_embeddings(
        self, embeddings: list[torch.Tensor], labels: torch.Tensor | None = None, group_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The loss from column embeddings [anchors [N, D], positives [N, D], *negatives [N, D]]."""
        if len(embeddings) < 2:
            raise ValueError(f"embeddings: expected at least 2 columns (anchor, positive), got {len(embeddings)}")
        negatives = torch.stack(embeddings[2:], dim=1) if len(embeddings) > 2 else None
        return fused_samtone_loss(
            embeddings[0],
            embeddings[1],
            negatives,
            temperature=self.temperature,
            directions=self.directions,
            partition=self.partition,
            doc_anchor_weight=self.doc_anchor_weight,
            group_ids=group_ids,
            normalize=self.normalize,
            backend=self.backend,
            gather_across_devices=self.gather_across_devices,
            hardness_mode=self.hardness_mode,
            hardness_strength=self.hardness_strength,
            chunk_bytes=self.chunk_bytes,
            false_negative_margin=self.false_negative_margin,
            hard_negative_scope=self.hard_negative_scope,
            matryoshka_dims=self.matryoshka_dims,
            matryoshka_weights=self.matryoshka_weights,
        )

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "directions": self.directions,
            "partition": self.partition,
            "doc_anchor_weight": self.doc_anchor_weight,
            "normalize": self.normalize,
            "gather_across_devices": self.gather_across_devices,
            "mask_duplicates": self.mask_duplicates,
            "mask_duplicate_positives": self.mask_duplicate_positives,
            "false_negative_margin": self.false_negative_margin,
            "hard_negative_scope": self.hard_negative_scope,
            "matryoshka_dims": self.matryoshka_dims,
            "matryoshka_weights": self.matryoshka_weights,
            "hardness_mode": self.hardness_mode,
            "hardness_strength": self.hardness_strength,
            "mini_batch_size": self.mini_batch_size,
            "mini_batch_num_tokens": self.mini_batch_num_tokens,
        }

    @property
    def citation(self) -> str:
        return """
@inproceedings{moiseev-etal-2023-samtone,
    title = "{S}am{T}o{N}e: Improving Contrastive Loss for Dual Encoder Retrieval Models with Same Tower Negatives",
    author = "Moiseev, Fedor and Hernandez Abrego, Gustavo and Dornbach, Peter and Zitouni, Imed and
              Alfonseca, Enrique and Dong, Zhe",
    booktitle = "Findings of the Association for Computational Linguistics: ACL 2023",
    year = "2023",
    publisher = "Association for Computational Linguistics",
    pages = "12028--12037",
    doi = "10.18653/v1/2023.findings-acl.761",
}
"""
