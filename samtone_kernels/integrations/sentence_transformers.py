"""A drop-in loss for sentence-transformers training: SamToNe and its relatives through the fused loss.

    from samtone_kernels.integrations.sentence_transformers import SamToNeLoss

    loss = SamToNeLoss(model)                      # instead of MultipleNegativesRankingLoss(model)
    trainer = SentenceTransformerTrainer(model=model, train_dataset=dataset, loss=loss)

It follows sentence-transformers' loss conventions (``forward(sentence_features, labels)`` over
(anchor, positive, *negatives) columns, ``compute_loss_from_embeddings``, ``get_config_dict`` for
the model card, ``citation``) and never imports sentence-transformers itself: it only calls the
model it is given, so the core library does not need the package (``pip install
samtone-kernels[st]`` installs it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .. import fused_samtone_loss
from .._options import check_options, check_temperature

_CITATION = """
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


def duplicate_groups(features: dict[str, torch.Tensor]) -> torch.Tensor:
    """[N] group ids of a tokenised column: rows with identical tokens (identical texts, up to the
    model's truncation) share an id. Embeddings cannot reveal duplicates under dropout; tokens can."""
    tokens = features["input_ids"]
    if "attention_mask" in features:
        tokens = tokens * features["attention_mask"]  # padding never tells two texts apart
    return torch.unique(tokens, dim=0, return_inverse=True)[1]


class SamToNeLoss(nn.Module):
    """In-batch contrastive loss with same-tower negatives, for ``SentenceTransformerTrainer``.

    Inputs are (anchor, positive) pairs or (anchor, positive, negative_1, ..., negative_n) tuples,
    with no labels; the anchors are the queries, the positives their documents and the negatives
    hard negatives of their own anchor. See ``samtone_kernels.fused_samtone_loss`` for the options.

    Parameters
    ----------
    model : SentenceTransformer
        The model to train (its output ``"sentence_embedding"`` is used).
    temperature : float, default 0.05
        Logits are cosine similarities (``normalize=True``) divided by it; MNRL's ``scale`` is
        ``1 / temperature``.
    directions : sequence of {"q2d", "q2q", "d2q", "d2d"}, default ("q2d", "q2q")
        SamToNe by default; ("q2d",) is MultipleNegativesRankingLoss.
    partition, doc_anchor_weight, normalize, gather_across_devices
        As in ``fused_samtone_loss``.
    mask_duplicate_positives : bool, default False
        Identical positive texts in a batch share a group id, so a duplicated document is never a
        negative of the other query that has it (the doc-doc ablation of the SamToNe paper). The
        groups are read off the tokenised positive column, since embeddings cannot show duplicates
        under dropout. Only ``forward`` sees the tokens; ``compute_loss_from_embeddings`` takes
        ``group_ids`` explicitly.
    backend : {"auto", "torch", "triton"}, default "auto"

    Notes
    -----
    Cached (GradCache-style) training, as in ``CachedMultipleNegativesRankingLoss``, is not built
    in: that pattern's cost is the encoder's activations, which mini-batching bounds, while this
    loss removes the other term, the N x M logit matrices. The two compose by hand: embed the
    columns in mini-batches without gradients, call ``compute_loss_from_embeddings`` on detached
    embeddings that require grad, backward, then re-embed each mini-batch with gradients and
    backpropagate the cached embedding gradients.
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
        mask_duplicate_positives: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        options = check_options(directions=directions, partition=partition, doc_anchor_weight=doc_anchor_weight,
                                normalize=normalize, reduction="mean", backend=backend)
        if isinstance(temperature, torch.Tensor):
            raise TypeError("temperature: expected a float")
        self.temperature = float(check_temperature(temperature))
        self.model = model
        self.directions = options.directions
        self.partition = options.partition
        self.doc_anchor_weight = options.doc_anchor_weight
        self.normalize = options.normalize
        self.backend = options.backend
        if not isinstance(gather_across_devices, bool) or not isinstance(mask_duplicate_positives, bool):
            raise TypeError("gather_across_devices, mask_duplicate_positives: expected bools")
        self.gather_across_devices = gather_across_devices
        self.mask_duplicate_positives = mask_duplicate_positives

    def forward(self, sentence_features: Iterable[dict[str, torch.Tensor]], labels: torch.Tensor | None) -> torch.Tensor:
        """Loss of a batch of tokenised columns (anchor, positive, *negatives)."""
        sentence_features = list(sentence_features)
        embeddings = [self.model(features)["sentence_embedding"] for features in sentence_features]
        group_ids = None
        if self.mask_duplicate_positives and len(sentence_features) >= 2:
            group_ids = duplicate_groups(sentence_features[1])
        return self.compute_loss_from_embeddings(embeddings, labels, group_ids=group_ids)

    def compute_loss_from_embeddings(self, embeddings: list[torch.Tensor], labels: torch.Tensor | None = None,
                                     group_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The loss from column embeddings [anchors [N, D], positives [N, D], *negatives [N, D]]."""
        if len(embeddings) < 2:
            raise ValueError(f"embeddings: expected at least 2 columns (anchor, positive), got {len(embeddings)}")
        negatives = torch.stack(embeddings[2:], dim=1) if len(embeddings) > 2 else None
        return fused_samtone_loss(
            embeddings[0], embeddings[1], negatives, temperature=self.temperature, directions=self.directions,
            partition=self.partition, doc_anchor_weight=self.doc_anchor_weight, group_ids=group_ids,
            normalize=self.normalize, backend=self.backend, gather_across_devices=self.gather_across_devices,
        )

    def get_config_dict(self) -> dict[str, Any]:
        """The options, as the model card records them."""
        return {
            "temperature": self.temperature,
            "directions": self.directions,
            "partition": self.partition,
            "doc_anchor_weight": self.doc_anchor_weight,
            "normalize": self.normalize,
            "gather_across_devices": self.gather_across_devices,
            "mask_duplicate_positives": self.mask_duplicate_positives,
        }

    @property
    def citation(self) -> str:
        return _CITATION
