"""Float64 NumPy reference for the SamToNe family of contrastive losses.

This package *defines* the semantics of ``samtone_kernels.fused_samtone_loss``: every other
implementation (the eager torch one and the fused Triton kernel) is tested against it. It is written
for clarity, never for speed, and depends on NumPy only.

>>> import numpy as np, reference
>>> q, d = np.random.randn(4, 8), np.random.randn(4, 8)
>>> loss = reference.samtone_loss(q, d, directions=("q2d", "q2q"))
>>> grads = reference.samtone_grad(q, d, directions=("q2d", "q2q"))
"""

from .samtone import (
    ALL_DIRECTIONS,
    HARD_NEGATIVE_SCOPES,
    HARDNESS_MODES,
    Blocks,
    build_blocks,
    hardness_mask,
    matryoshka_grad,
    matryoshka_loss,
    samtone_grad,
    samtone_loss,
)

__all__ = [
    "ALL_DIRECTIONS",
    "HARD_NEGATIVE_SCOPES",
    "HARDNESS_MODES",
    "Blocks",
    "build_blocks",
    "hardness_mask",
    "matryoshka_grad",
    "matryoshka_loss",
    "samtone_grad",
    "samtone_loss",
]
