from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ... import fused_samtone_loss
from ..._options import check_chunk_bytes
from ._common import (
    DIRECTION_NAMES,
    PARTITION_NAMES,
    _fused_normalize,
    _similarity_name,
    _st_util,
    cos_sim,
    embed_columns,
    pair_groups,
)

logger = logging.getLogger(__name__)


class FusedMultipleNegativesRankingLoss(nn.Module):
    """sentence-transformers' ``MultipleNegativesRankingLoss`` (MNRL), computed by ``fused_samtone_loss``.

    Takes MNRL's arguments, in its order and with its defaults, keeps them as the same attributes,
    refuses what MNRL refuses with the same errors, and gives MNRL's loss and gradients (tested
    against the installed package), so replacing the import is the whole migration. On CUDA the loss
    runs in the fused Triton kernel, which never materialises the [N, M] similarity matrices.

    ``forward(sentence_features, labels)`` embeds the anchor column in one model call and the
    candidate columns (positive, negatives) merged into one more, as MNRL does, so dropout draws the
    same masks as MNRL under the same seed. ``labels`` are unused.

    Args:
        model: The SentenceTransformer to train; its ``"sentence_embedding"`` output is used.
        scale: Similarities are multiplied by it: ``temperature = 1 / scale``. Default 20.0.
        similarity_fct: ``sentence_transformers.util.cos_sim`` (default; normalised embeddings) or
            ``dot_score``, recognised by identity or by name; another similarity raises
            ``ValueError`` (the kernel computes these two).
        gather_across_devices: Every rank's embeddings are candidates
            (``fused_samtone_loss(gather_across_devices=True)``).
        directions: Names from "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"
            ("q2d", "q2q", "d2q", "d2d" in this library's terms). Default ``("query_to_doc",)``.
        partition_mode: One softmax over every direction ("joint", default), or one per direction,
            averaged ("per_direction": this library's ``partition="per_anchor"``; MNRL allows it only
            with "query_to_doc" and "doc_to_query", whose candidates hold the positive).
        hardness_mode: MNRL's hardness weighting: None (default), "in_batch_negatives",
            "hard_negatives" or "all_negatives" (``hardness_strength * stop_grad(similarity)`` added
            to the chosen negatives' logits); passed to ``fused_samtone_loss`` when set.
        hardness_strength: Its strength, non-negative. Default 0.0.

    Attributes beyond MNRL's:
        chunk_bytes: Memory budget of one chunk of materialised logits where a backend materialises
            them, as in ``fused_samtone_loss`` (None: 1 GiB). Not a constructor argument, so that
            the signature stays MNRL's: set it on the loss (``loss.chunk_bytes = 256 << 20``).
        mask_duplicates: False (MNRL's numbers) by default; True: pairs with identical anchor texts
            or identical positive texts share a group id (read off the tokens in ``forward``), so
            neither a repeated query nor a repeated document is a negative of its copy's pair.
        false_negative_margin: None (default, MNRL's numbers); a number: drop the candidates more
            similar to the anchor than its positive by more than it (``fused_samtone_loss``).
        hard_negative_scope: "shared" (default, MNRL's layout: every query sees every row's
            negatives); "own": the negatives of row i are candidates of anchor i only.
        matryoshka_dims, matryoshka_weights: None (default); Matryoshka prefixes (strictly
            increasing, the last the model's dimension) and their weights, the loss of
            ``MatryoshkaLoss(model, this loss, dims)`` in one call (``fused_samtone_loss``).

    References:
        - Representation Learning with Contrastive Predictive Coding (InfoNCE): https://arxiv.org/abs/1807.03748
        - Jina Embeddings 2 (symmetric InfoNCE, "per_direction"): https://arxiv.org/abs/2310.19923
        - Towards General Text Embeddings with Multi-stage Contrastive Learning (GTE, all four directions,
          "joint"): https://arxiv.org/abs/2308.03281

    Requirements:
        1. (anchor, positive) pairs or (anchor, positive, negative_1, ..., negative_n) tuples, no labels.

    Relations:
        - :class:`FusedCachedMultipleNegativesRankingLoss` is this loss with gradient caching.
        - :class:`SamToNeRankingLoss` is this loss in this library's terms, with duplicate masking.

    Example:
        ::

            from samtone_kernels.integrations.sentence_transformers import (
                FusedMultipleNegativesRankingLoss as MultipleNegativesRankingLoss)

            loss = MultipleNegativesRankingLoss(model, directions=("query_to_doc", "query_to_query"))
            trainer = SentenceTransformerTrainer(model=model, train_dataset=train_dataset, loss=loss)
            trainer.train()
    """

    def __init__(
        self,
        model: nn.Module,
        scale: float = 20.0,
        similarity_fct: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cos_sim,
        gather_across_devices: bool = False,
        directions: tuple[str, ...] = ("query_to_doc",),
        partition_mode: str = "joint",
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
    ) -> None:
        super().__init__()
        # MNRL's checks, in its order and with its messages; ours (the similarity) come after.
        self.model = model
        self.scale = scale
        if not scale > 0:
            raise ValueError("Scale must be a positive value.")
        if similarity_fct is cos_sim and _st_util() is not None:
            similarity_fct = _st_util().cos_sim
        self.similarity_fct = similarity_fct
        self.gather_across_devices = gather_across_devices

        valid_directions = {"query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"}  # MNRL's, in its order
        if not directions:
            raise ValueError("At least one direction must be specified.")
        if not set(directions).issubset(valid_directions):
            raise ValueError(f"Invalid directions: {set(directions) - valid_directions}. Valid: {valid_directions}")
        if "query_to_doc" not in directions:
            raise ValueError("'query_to_doc' direction is required (contains the positive pair).")
        self.directions = tuple(directions)

        if partition_mode not in PARTITION_NAMES:
            raise ValueError(f"partition_mode must be 'joint' or 'per_direction', got {partition_mode}")
        if partition_mode == "per_direction" and set(directions) & {"query_to_query", "doc_to_doc"}:
            raise ValueError(
                "partition_mode='per_direction' requires every direction's candidate pool to include the positive pair. "
                "'query_to_query' and 'doc_to_doc' only contain same-type similarities and never include the positive, "
                "making the per-direction loss ill-defined. Use partition_mode='joint' instead."
            )
        self.partition_mode = partition_mode

        valid_hardness_modes = {None, "in_batch_negatives", "hard_negatives", "all_negatives"}
        if hardness_mode not in valid_hardness_modes:
            raise ValueError(f"hardness_mode must be one of {valid_hardness_modes}, got {hardness_mode!r}")
        self.hardness_mode = hardness_mode
        if hardness_strength < 0.0:
            raise ValueError("hardness_strength must be non-negative.")
        self.hardness_strength = hardness_strength
        if hardness_mode is not None and hardness_strength == 0.0:
            logger.warning(
                f"hardness_mode={hardness_mode!r} is set but hardness_strength=0.0, so hardness weighting has no "
                "effect. Set hardness_strength to a positive value to enable hardness weighting."
            )
        _fused_normalize(self.similarity_fct)
        # Not MNRL arguments (the signature is MNRL's): attributes to set.
        self.chunk_bytes = None
        self.mask_duplicates = False
        self.false_negative_margin = None
        self.hard_negative_scope = "shared"
        self.matryoshka_dims = None
        self.matryoshka_weights = None

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    def forward(
        self, sentence_features: Iterable[dict[str, torch.Tensor]], labels: torch.Tensor | None
    ) -> torch.Tensor:
        """Loss of a batch of tokenised columns (anchor, positive, *negatives)."""
        sentence_features = list(sentence_features)
        group_ids = pair_groups(sentence_features) if self.mask_duplicates else None
        embeddings = embed_columns(self.model, sentence_features)
        return self.compute_loss_from_embeddings(embeddings, labels, group_ids=group_ids)

    def compute_loss_from_embeddings(
        self, embeddings: list[torch.Tensor], labels: torch.Tensor | None = None, group_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The loss from column embeddings: anchors [N, D], positives [N, D], *negatives [N, D]."""
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        negatives = torch.stack(list(embeddings[2:]), dim=1) if len(embeddings) > 2 else None  # [N, H, D]
        hardness = {}
        if self.hardness_mode is not None and self.hardness_strength > 0:  # else a no-op (MNRL warns)
            hardness = {"hardness_mode": self.hardness_mode, "hardness_strength": self.hardness_strength}
        return fused_samtone_loss(
            embeddings[0],
            embeddings[1],
            negatives,
            temperature=1.0 / self.scale,
            directions=tuple(DIRECTION_NAMES[name] for name in self.directions),
            partition=PARTITION_NAMES[self.partition_mode],
            normalize=_fused_normalize(self.similarity_fct),
            gather_across_devices=self.gather_across_devices,
            chunk_bytes=check_chunk_bytes(self.chunk_bytes),
            false_negative_margin=self.false_negative_margin,
            hard_negative_scope=self.hard_negative_scope,
            matryoshka_dims=self.matryoshka_dims,
            matryoshka_weights=self.matryoshka_weights,
            group_ids=group_ids,
            **hardness,
        )

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "similarity_fct": _similarity_name(self.similarity_fct),
            "gather_across_devices": self.gather_across_devices,
            "directions": self.directions,
            "partition_mode": self.partition_mode,
            "hardness_mode": self.hardness_mode,
            "hardness_strength": self.hardness_strength,
        }

    @property
    def citation(self) -> str:
        """MNRL's citation for this configuration: GTE, Jina (symmetric InfoNCE) or InfoNCE."""
        if set(self.directions) == set(DIRECTION_NAMES) and self.partition_mode == "joint":
            return """
@misc{li2023generaltextembeddingsmultistage,
      title={Towards General Text Embeddings with Multi-stage Contrastive Learning},
      author={Zehan Li and Xin Zhang and Yanzhao Zhang and Dingkun Long and Pengjun Xie and Meishan Zhang},
      year={2023},
      eprint={2308.03281},
      archivePrefix={arXiv},
      primaryClass={cs.CL},
      url={https://arxiv.org/abs/2308.03281},
}
"""
        if set(self.directions) == {"query_to_doc", "doc_to_query"} and self.partition_mode == "per_direction":
            return """
@misc{günther2024jinaembeddings28192token,
      title={Jina Embeddings 2: 8192-Token General-Purpose Text Embeddings for Long Documents},
      author={Michael Günther and Jackmin Ong and Isabelle Mohr and Alaeddine Abdessalem and Tanguy Abel and Mohammad Kalim Akram and Susana Guzman and Georgios Mastrapas and Saba Sturua and Bo Wang and Maximilian Werk and Nan Wang and Han Xiao},
      year={2024},
      eprint={2310.19923},
      archivePrefix={arXiv},
      primaryClass={cs.CL},
      url={https://arxiv.org/abs/2310.19923},
}
"""
        return """
@misc{oord2019representationlearningcontrastivepredictive,
      title={Representation Learning with Contrastive Predictive Coding},
      author={Aaron van den Oord and Yazhe Li and Oriol Vinyals},
      year={2019},
      eprint={1807.03748},
      archivePrefix={arXiv},
      primaryClass={cs.LG},
      url={https://arxiv.org/abs/1807.03748},
}
"""
