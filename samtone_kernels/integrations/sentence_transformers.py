"""Drop-in losses for sentence-transformers training, computed by the fused loss.

    from samtone_kernels.integrations.sentence_transformers import (
        FusedMultipleNegativesRankingLoss as MultipleNegativesRankingLoss,                # one import
        FusedCachedMultipleNegativesRankingLoss as CachedMultipleNegativesRankingLoss,
        SamToNeLoss,
    )

``FusedMultipleNegativesRankingLoss`` and ``FusedCachedMultipleNegativesRankingLoss`` take the
arguments of sentence-transformers' ``MultipleNegativesRankingLoss`` and
``CachedMultipleNegativesRankingLoss`` (same order, defaults, attributes, errors, config dict and
citation) and give the same loss and gradients. ``SamToNeLoss`` speaks this library's own terms
(temperature, "q2d"-style directions, group ids from duplicate positives).

All follow sentence-transformers' loss conventions (``forward(sentence_features, labels)`` over
(anchor, positive, *negatives) columns, ``compute_loss_from_embeddings``, ``get_config_dict`` for
the model card, ``citation``). The module imports without sentence-transformers; the MNRL classes
import it lazily, where they use its helpers (``pip install samtone-kernels[st]``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import fused_samtone_loss
from .._backends import check_backend_name
from .._options import check_options, check_temperature
from ..gradcache import GradCache

logger = logging.getLogger(__name__)

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
        SamToNe by default; ("q2d",) is MultipleNegativesRankingLoss. sentence-transformers' names
        ("query_to_doc", ...) are accepted too.
    partition, doc_anchor_weight, normalize, gather_across_devices, hardness_mode, hardness_strength
        As in ``fused_samtone_loss``; ``normalize`` defaults to True here (cosine similarity, as
        sentence-transformers' ``cos_sim``), to False there.
    mask_duplicate_positives : bool, default False
        Identical positive texts in a batch share a group id, so a duplicated document is never a
        negative of the other query that has it (the doc-doc ablation of the SamToNe paper). The
        groups are read off the tokenised positive column, since embeddings cannot show duplicates
        under dropout. Only ``forward`` sees the tokens; ``compute_loss_from_embeddings`` takes
        ``group_ids`` explicitly.
    backend : {"auto", "torch", "triton"}, default "auto"
    mini_batch_size : int, optional
        Cached (GradCache) training, as ``FusedCachedMultipleNegativesRankingLoss``: the columns are
        embedded in mini-batches of this many rows without gradients, and re-embedded one
        mini-batch at a time in backward (same RNG state: dropout replays), so the encoder's memory
        is that of one mini-batch. None (default): one forward per column, uncached.
    mini_batch_num_tokens : int, optional
        With ``mini_batch_size``: pack mini-batches by non-padding token count instead.

    Notes
    -----
    The fused loss removes the N x M logit matrices; caching bounds the other cost, the encoder's
    activations. In a loop of your own, embed with ``samtone_kernels.gradcache.GradCache`` and call
    ``compute_loss_from_embeddings``.
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
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
        mini_batch_size: int | None = None,
        mini_batch_num_tokens: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(directions, str) and isinstance(directions, Sequence):
            directions = tuple(_DIRECTIONS.get(name, name) for name in directions)  # long names too
        options = check_options(directions=directions, partition=partition, doc_anchor_weight=doc_anchor_weight,
                                normalize=normalize, reduction="mean", hardness_mode=hardness_mode,
                                hardness_strength=hardness_strength, gather_across_devices=gather_across_devices)
        for name, value in (("mini_batch_size", mini_batch_size), ("mini_batch_num_tokens", mini_batch_num_tokens)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: expected an int >= 1 or None, got {value!r}")
        if mini_batch_num_tokens is not None and mini_batch_size is None:
            raise ValueError("mini_batch_num_tokens: needs mini_batch_size (cached training)")
        self.hardness_mode = options.hardness_mode
        self.hardness_strength = options.hardness_strength
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
        self.backend = check_backend_name(backend)
        if not isinstance(mask_duplicate_positives, bool):
            raise TypeError(f"mask_duplicate_positives: expected a bool, got {type(mask_duplicate_positives).__name__}")
        self.gather_across_devices = options.gather_across_devices
        self.mask_duplicate_positives = mask_duplicate_positives

    def forward(self, sentence_features: Iterable[dict[str, torch.Tensor]], labels: torch.Tensor | None) -> torch.Tensor:
        """Loss of a batch of tokenised columns (anchor, positive, *negatives); cached with
        ``mini_batch_size``."""
        sentence_features = list(sentence_features)
        self._group_ids = None  # read by calculate_loss, for this batch only
        if self.mask_duplicate_positives and len(sentence_features) >= 2:
            self._group_ids = duplicate_groups(sentence_features[1])
        if self.mini_batch_size is not None:
            return _cached_loss(self, sentence_features, labels, self.mini_batch_size, self.mini_batch_num_tokens,
                                show_progress_bar=False)
        embeddings = _embed_columns(self.model, sentence_features)  # candidate columns merged, as MNRL
        return self.compute_loss_from_embeddings(embeddings, labels, group_ids=self._group_ids)

    @property
    def uses_gradient_cache(self) -> bool:
        """Cached training backpropagates from the returned loss's backward (wrappers read this)."""
        return self.mini_batch_size is not None

    def calculate_loss(self, reps: list[list[torch.Tensor]], labels: torch.Tensor | None = None, *,
                       with_backward: bool = False) -> torch.Tensor:
        """The loss from per-column lists of mini-batch embeddings [m_k, D] (cached training); with
        ``with_backward``, backpropagated to ``reps`` and returned detached."""
        columns = [col[0] if len(col) == 1 else torch.cat(col) for col in reps]
        loss = self.compute_loss_from_embeddings(columns, labels, group_ids=getattr(self, "_group_ids", None))
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

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
            hardness_mode=self.hardness_mode, hardness_strength=self.hardness_strength,
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
            "hardness_mode": self.hardness_mode,
            "hardness_strength": self.hardness_strength,
            "mini_batch_size": self.mini_batch_size,
            "mini_batch_num_tokens": self.mini_batch_num_tokens,
        }

    @property
    def citation(self) -> str:
        return _CITATION


# --------------------------------------------------------------------------------------------------
# MultipleNegativesRankingLoss and CachedMultipleNegativesRankingLoss, fused
# --------------------------------------------------------------------------------------------------
_DIRECTIONS = {"query_to_doc": "q2d", "query_to_query": "q2q", "doc_to_query": "d2q", "doc_to_doc": "d2d"}
_PARTITIONS = {"joint": "joint", "per_direction": "per_anchor"}

_CITATION_GTE = """
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
_CITATION_JINA = """
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
_CITATION_INFONCE = """
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
_CITATION_GRADCACHE = """
@misc{gao2021scaling,
    title={Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
    author={Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan},
    year={2021},
    eprint={2101.06983},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
"""


def cos_sim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity matrix [A, B] of [A, D] and [B, D]. The default ``similarity_fct``: the
    constructors replace it by ``sentence_transformers.util.cos_sim`` (this module does not import
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
    if similarity_fct is cos_sim or (util is not None and any(similarity_fct is f for f in (util.cos_sim,
                                                                                           util.pytorch_cos_sim))):
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


def _embed_columns(model: nn.Module, sentence_features: Iterable[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """One embedding tensor per column: the anchors in one forward, the candidate columns (positive
    and negatives) merged into one more where they tokenise alike, as MNRL does
    (``sentence_transformers.base.losses.merged_forward.embed_columns``); one forward per column
    with a sentence-transformers that does not have it."""
    try:
        from sentence_transformers.base.losses.merged_forward import embed_columns
    except ImportError:
        return [model(features)["sentence_embedding"] for features in sentence_features]
    return embed_columns(model, sentence_features)


class FusedMultipleNegativesRankingLoss(nn.Module):
    """sentence-transformers' ``MultipleNegativesRankingLoss`` (MNRL), computed by ``fused_samtone_loss``.

    Takes MNRL's arguments, in its order and with its defaults, keeps them as the same attributes,
    refuses what MNRL refuses with the same errors, and gives MNRL's loss and gradients (tested
    against the installed package), so replacing the import is the whole migration. On CUDA the loss
    runs in the fused Triton kernel, which never materialises the [N, M] similarity matrices.

    Parameters
    ----------
    model : SentenceTransformer
        The model to train; its ``"sentence_embedding"`` output is used.
    scale : float, default 20.0
        Similarities are multiplied by it: ``temperature = 1 / scale``.
    similarity_fct : callable, default ``sentence_transformers.util.cos_sim``
        ``cos_sim`` (normalised embeddings) or ``dot_score``, recognised by identity or by name;
        another similarity raises ``ValueError`` (the kernel computes these two).
    gather_across_devices : bool, default False
        Every rank's embeddings are candidates (``fused_samtone_loss(gather_across_devices=True)``).
    directions : tuple of {"query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"}
        Default ``("query_to_doc",)``: "q2d", "q2q", "d2q", "d2d" in this library's terms.
    partition_mode : {"joint", "per_direction"}, default "joint"
        One softmax over every direction ("joint"), or one per direction, averaged
        ("per_direction": this library's ``partition="per_anchor"``; MNRL allows it only with
        "query_to_doc" and "doc_to_query", whose candidates hold the positive).
    hardness_mode : {None, "in_batch_negatives", "hard_negatives", "all_negatives"}, default None
    hardness_strength : float, default 0.0
        MNRL's hardness weighting (``hardness_strength * stop_grad(similarity)`` added to the chosen
        negatives' logits); passed to ``fused_samtone_loss`` when ``hardness_mode`` is set.

    Notes
    -----
    ``forward(sentence_features, labels)`` embeds the anchor column in one model call and the
    candidate columns (positive, negatives) merged into one more, as MNRL does, so dropout draws the
    same masks as MNRL under the same seed. ``labels`` are unused.

    Examples
    --------
    >>> from samtone_kernels.integrations.sentence_transformers import (
    ...     FusedMultipleNegativesRankingLoss as MultipleNegativesRankingLoss)
    >>> loss = MultipleNegativesRankingLoss(model, directions=("query_to_doc", "query_to_query"))  # doctest: +SKIP
    >>> trainer = SentenceTransformerTrainer(model=model, train_dataset=dataset, loss=loss)       # doctest: +SKIP
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

        if partition_mode not in _PARTITIONS:
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

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    def forward(self, sentence_features: Iterable[dict[str, torch.Tensor]],
                labels: torch.Tensor | None) -> torch.Tensor:
        """Loss of a batch of tokenised columns (anchor, positive, *negatives)."""
        embeddings = _embed_columns(self.model, sentence_features)
        return self.compute_loss_from_embeddings(embeddings, labels)

    def compute_loss_from_embeddings(self, embeddings: list[torch.Tensor], labels: torch.Tensor | None = None
                                     ) -> torch.Tensor:
        """The loss from column embeddings: anchors [N, D], positives [N, D], *negatives [N, D]."""
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        negatives = torch.stack(list(embeddings[2:]), dim=1) if len(embeddings) > 2 else None  # [N, H, D]
        hardness = {}
        if self.hardness_mode is not None:
            hardness = {"hardness_mode": self.hardness_mode, "hardness_strength": self.hardness_strength}
        return fused_samtone_loss(
            embeddings[0], embeddings[1], negatives,
            temperature=1.0 / self.scale,
            directions=tuple(_DIRECTIONS[name] for name in self.directions),
            partition=_PARTITIONS[self.partition_mode],
            normalize=_fused_normalize(self.similarity_fct),
            gather_across_devices=self.gather_across_devices,
            **hardness,
        )

    def get_config_dict(self) -> dict[str, Any]:
        """MNRL's config dict, for the model card."""
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
        if set(self.directions) == set(_DIRECTIONS) and self.partition_mode == "joint":
            return _CITATION_GTE
        if set(self.directions) == {"query_to_doc", "doc_to_query"} and self.partition_mode == "per_direction":
            return _CITATION_JINA
        return _CITATION_INFONCE


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


def _cached_loss(loss: nn.Module, sentence_features: Iterable[dict[str, torch.Tensor]], labels: torch.Tensor | None,
                 mini_batch_size: int, mini_batch_num_tokens: int | None, show_progress_bar: bool) -> torch.Tensor:
    """GradCache through ``loss.calculate_loss(reps, labels, with_backward=...)`` (the protocol of
    sentence-transformers' cached losses): embed every column in mini-batches without gradients,
    backpropagate the loss to the embeddings, and return the loss with a surrogate term whose
    backward re-embeds each mini-batch under its saved RNG state (``GradCache``)."""
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
        cache.embed_mini_batches(encode, _progress(show_progress_bar,
                                                   [create_minibatch(f, b, e) for b, e in column_ranges]))
        for f, column_ranges in zip(sentence_features, ranges)
    ]
    if not torch.is_grad_enabled():
        return loss.calculate_loss(columns, labels)

    # Step 2 on detached copies, through calculate_loss (which a wrapper may have decorated).
    reps = [[e.detach().requires_grad_() for e in column] for column in columns]
    value = loss.calculate_loss(reps, labels, with_backward=True)
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
        for column, rep_column in zip(columns, reps) for e, r in zip(column, rep_column)
        for dtype in [torch.promote_types(e.dtype, torch.float32)]
    )
    return value + (surrogate - surrogate.detach()).to(value.dtype)


class FusedCachedMultipleNegativesRankingLoss(nn.Module):
    """sentence-transformers' ``CachedMultipleNegativesRankingLoss`` (GradCache MNRL), fused.

    The arguments, attributes, errors, config dict and citation of
    ``CachedMultipleNegativesRankingLoss``; the loss of :class:`FusedMultipleNegativesRankingLoss`
    (which it holds as ``.loss``, as the original holds an MNRL), with gradient caching from
    :class:`samtone_kernels.gradcache.GradCache` (Gao et al. 2021):

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

    Parameters
    ----------
    model, scale, similarity_fct, gather_across_devices, directions, partition_mode, hardness_mode,
    hardness_strength
        As in :class:`FusedMultipleNegativesRankingLoss`.
    mini_batch_size : int, default 32
        Rows per embedding mini-batch.
    mini_batch_num_tokens : int, optional
        Pack mini-batches by non-padding token count instead (sentence-transformers' packing).
    show_progress_bar : bool, default False
        A progress bar over the embedding mini-batches.
    """

    uses_gradient_cache = True  # back-propagates from the returned loss's backward (MatryoshkaLoss reads this)

    _delegated_to_wrapped_loss = (
        "scale", "similarity_fct", "gather_across_devices", "directions", "partition_mode", "hardness_mode",
        "hardness_strength",
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
            model, scale=scale, similarity_fct=similarity_fct, gather_across_devices=gather_across_devices,
            directions=directions, partition_mode=partition_mode, hardness_mode=hardness_mode,
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
    def temperature(self) -> float:
        return 1.0 / self.scale

    def calculate_loss(self, reps: list[list[torch.Tensor]], labels: torch.Tensor | None = None, *,
                       with_backward: bool = False) -> torch.Tensor:
        """The loss of the whole batch from per-column lists of mini-batch embeddings [m_k, D].

        With ``with_backward``, backpropagate it to ``reps`` (their ``.grad``) and return it detached:
        the protocol of sentence-transformers' cached losses, which ``MatryoshkaLoss`` decorates.
        """
        columns = [col[0] if len(col) == 1 else torch.cat(col) for col in reps]
        loss = self.loss.compute_loss_from_embeddings(columns, labels)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def forward(self, sentence_features: Iterable[dict[str, torch.Tensor]],
                labels: torch.Tensor | None) -> torch.Tensor:
        """Loss of a batch of tokenised columns (anchor, positive, *negatives); see the class notes."""
        return _cached_loss(self, sentence_features, labels, self.mini_batch_size, self.mini_batch_num_tokens,
                            self.show_progress_bar)

    def get_config_dict(self) -> dict[str, Any]:
        """CachedMultipleNegativesRankingLoss's config dict, for the model card: the wrapped loss's,
        with the mini-batch keys after the similarity, in the original's order."""
        config = self.loss.get_config_dict()
        head = {key: config[key] for key in ("scale", "similarity_fct")}
        mini_batches = {"mini_batch_size": self.mini_batch_size, "mini_batch_num_tokens": self.mini_batch_num_tokens}
        return head | mini_batches | config

    @property
    def citation(self) -> str:
        return _CITATION_GRADCACHE
