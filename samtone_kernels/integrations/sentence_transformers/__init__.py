"""sentence-transformers losses computed by ``fused_samtone_loss`` (``pip install samtone-kernels[st]``).

    from samtone_kernels.integrations.sentence_transformers import (
        FusedMultipleNegativesRankingLoss,        # MultipleNegativesRankingLoss, its arguments, fused
        FusedCachedMultipleNegativesRankingLoss,  # CachedMultipleNegativesRankingLoss (GradCache), fused
        SamToNeRankingLoss,                       # SamToNe in this library's terms, duplicate masking
        duplicate_groups,                         # group ids of a tokenised column
        DIRECTION_NAMES,                          # sentence-transformers' direction names -> "q2d", ...
        cos_sim,                                  # the default similarity_fct without sentence-transformers
    )

Nothing here imports sentence-transformers at import time.
"""

from __future__ import annotations

import warnings

from ._common import DIRECTION_NAMES, cos_sim, duplicate_groups
from .cached_multiple_negatives_ranking import FusedCachedMultipleNegativesRankingLoss
from .multiple_negatives_ranking import FusedMultipleNegativesRankingLoss
from .samtone_ranking import SamToNeRankingLoss

__all__ = [
    "DIRECTION_NAMES",
    "FusedCachedMultipleNegativesRankingLoss",
    "FusedMultipleNegativesRankingLoss",
    "SamToNeRankingLoss",
    "cos_sim",
    "duplicate_groups",
]


def __getattr__(name: str):
    if name == "SamToNeLoss":  # the old name, which clashed with samtone_kernels.SamToNeLoss (embeddings in)
        warnings.warn(
            "samtone_kernels.integrations.sentence_transformers.SamToNeLoss is deprecated: use SamToNeRankingLoss "
            "(samtone_kernels.SamToNeLoss is the core nn.Module, which takes embeddings)",
            DeprecationWarning,
            stacklevel=2,
        )
        return SamToNeRankingLoss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
