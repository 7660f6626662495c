"""Names and numbers every layer shares: the option vocabularies, the input dtypes, the normalisation's
epsilon, and the interpreter switch. A leaf: it imports nothing of the package."""

from __future__ import annotations

import os

import torch

ALL_DIRECTIONS = ("q2d", "q2q", "d2q", "d2d")
PARTITIONS = ("per_anchor", "joint")
HARDNESS_MODES = (None, "in_batch_negatives", "hard_negatives", "all_negatives")
HARD_NEGATIVE_SCOPES = ("shared", "own")  # who sees pair i's hard negatives: every anchor, or query i alone
REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # every input dtype (one table)
NORM_EPS = 1e-12  # normalize=True divides by max(|x|, NORM_EPS), as torch.nn.functional.normalize


def interpreting() -> bool:
    """True when Triton kernels run under its interpreter (``TRITON_INTERPRET=1``, read at call time)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
