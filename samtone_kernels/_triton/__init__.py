"""Fused Triton kernels: per-anchor log-partitions of the SamToNe logit blocks, forward and backward,
in O(N * D) memory (no N x M buffer of any kind).

Layers, bottom to top, one module each:

1. ``tiles`` and ``sweeps``: ``@triton.jit`` helpers. ``tiles``: logit tiles of one or two candidate
   segments from one load of the row tile, their keep-mask and hardness penalty, the forward's online
   log-sum-exp. ``sweeps``: the backward's coefficient tiles and its sweeps over D. A segment's part
   is one integer *role* constexpr (``_plan.Launch.roles``), read with ``tiles.has``.
2. ``kernels``: ``lse_kernel`` (one program per block of anchor rows) and ``grad_kernel`` (one program
   per block of rows of the tensor whose gradient it makes); ``epilogue``: ``epilogue_kernel`` (a
   float32 buffer to the gradient in the input dtype, where the normalisation needs whole rows);
   ``configs``: the autotuner's configs per architecture and their prune.
3. ``launch``: the launchers (a call's tensors and kernel arguments, the forward's and backward's
   launches); ``ops``: the two ``torch.library.custom_op``s with fakes and an autograd formula.

The launches come from ``samtone_kernels._plan`` (the table every backend reads).

Gradient, in short: with F = sum w lse and P = exp(s - lse), dF/ds = w P; one tile S = scale X Y^T
serves the row block (X anchors) and the column block (Y anchors), so the coefficient tile is
``G_ij = w_X,i P_row,ij + w_Y,j P_col,ij`` and x_i's whole gradient is ``scale * sum_j G_ij y_j`` over
the segments it walks: one launch per tensor, over its own rows, and no launch reads what another
wrote. The temperature's gradient follows from homogeneity, ``F(cX, scale) = F(X, c^2 scale)``:
``dF/dscale = sum_X <X, dF/dX> / (2 scale)``. The full derivation, the work and traffic accounting,
the memory bound and the determinism argument are in ``docs/DESIGN.md``.
"""

from .configs import INTERPRETING
from .kernels import AUTOTUNED
from .ops import normed_for, prepare_triton, row_lse_backward_op, row_lse_op, row_stats_triton

__all__ = [
    "AUTOTUNED",
    "INTERPRETING",
    "normed_for",
    "prepare_triton",
    "row_lse_backward_op",
    "row_lse_op",
    "row_stats_triton",
]
