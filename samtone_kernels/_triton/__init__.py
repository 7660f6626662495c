"""Fused Triton kernels: per-anchor log-partitions of the SamToNe logit blocks, forward and backward,
in O(N * D) memory (no N x M buffer of any kind).

Layers, bottom to top, one module each:

1. ``tiles``: ``@triton.jit`` helpers: the logit tiles of the Q and D segments at the same columns
   from one load of the row tile (a K-loop over D chunks), their keep-mask, the online log-sum-exp
   of the forward, and the backward's coefficient tiles G and the sweep over D that adds their
   ``G Y``. With ``normalize=True`` (NORMED, where ``ops.normed_for`` says so) the kernels read the
   raw embeddings and scale each logit tile by its rows' inverse norms (and each coefficient tile by
   the columns' before ``G Y``): the logits of the unit vectors, with no normalised copy and nothing
   added inside the K-loop.
2. ``kernels``: ``lse_kernel`` (one program per block of anchor rows), ``grad_kernel`` (one program
   per block of rows of the tensor whose gradient it makes, which its last sweep writes in the input
   dtype), ``epilogue_kernel`` (a float32 buffer to the gradient in the input dtype, where the
   normalisation needs whole rows first), and their autotuning.
Candidates come in *segments* of N rows: the queries, the positive documents, and each block
``hard_negatives[:, k]``. ``plan.BLOCKS`` lists the blocks (anchor kind x segment, and the entries a
block removes: the own pair, the group).

Gradient (derivation). The kernels compute F = sum_{a,i} w_{a,i} lse_{a,i}, where w = dL/dlse is the
upstream gradient and lse_{a,i} = log sum_{x kept} exp(s_x), s_x = scale * (x_anchor . y_x). Then

    dF/ds_x = w_{a,i} * P_x,        P_x = exp(s_x - lse_{a,i})    (0 where masked)
    dF/dx_anchor    = scale * sum_x (w P)_x y_x
    dF/dy_candidate = scale * sum_{a,i} (w P)_{a,i,x} x_{a,i}

One tile S = scale * X Y^T holds the logits of two blocks when both X and Y are anchor kinds: row i
with lse_X[i] gives the block (X anchors, Y candidates), column j with lse_Y[j] gives (Y anchors, X
candidates), since s(y_j, x_i) = S_ij. So the coefficient of the tile is

    G_ij = w_X,i exp(S_ij - lse_X,i) [row block] + w_Y,j exp(S_ij - lse_Y,j) [column block]

and x_i's gradient is scale * sum_j G_ij y_j over every segment Y: the whole of it, from tiles whose
rows are x's. For X = Y (q2q, d2d) this is dq_i = scale * sum_j (w_i P_ij + w_j P_ji) q_j: the
symmetric block needs no second pass. ``grad_kernel`` therefore runs once per tensor, over its own
rows (``plan.backward_launches``), and no launch reads a buffer another wrote; the hard negatives,
which are never anchors, take only column blocks. The positive logits add w_p,i * scale * d_i to
dF/dq_i and w_p,i * scale * q_i to dF/dd_i (in the last sweep, or the epilogue). For the temperature, F is homogeneous:
F(c X, scale) = F(X, c^2 scale) for every embedding X (the positive logits included), so d/dc at
c = 1 gives  sum_X <X, dF/dX> = 2 scale dF/dscale : the scale's gradient costs one dot product of
the embedding gradients, no kernel work.

Work (tile matmuls of N x N x D, ``plan.tile_units``, counted by the tests under the interpreter):
a block's textbook cost is 3 (S = X Y^T forward; G Y and G^T X backward). The forward computes one
tile per walked segment; each backward walk recomputes the tile and multiplies it once. Executed /
textbook, with the candidates being the anchors: InfoNCE 5/3 (the positives' gradient needs its own
walk over the tiles), SamToNe (q2d, q2q) 8/6, symmetric InfoNCE (q2d, d2q) 6/6, bidirectional
SamToNe 12/12; a hard-negative block, which has no partner, 5/3. Across devices a tile's transpose
may live on another rank, so anchors and gathered candidates walk it separately (5/3 per block).

Traffic (bytes of global loads and stores per textbook FLOP, counted by the tests under the
interpreter; figures in bench/RESULTS.md). Per program of BM rows against column tiles of BN pairs
at dimension D, element size e: each column tile loads the row tile X once (e BM D) for the logit
tiles of every segment walked with it (the Q and D segments go together) and each candidate tile
(e BN D); the backward loads each candidate tile again for ``G Y`` and reads and writes its float32
gradient rows (8 BM D bytes) once per *sweep* over D, which adds two coefficient tiles at once (a
paired walk's Q and D tiles, or two column tiles of a lone segment). The first sweep stores without
reading and the last writes the gradient in the input dtype (e BM D, and the positive logit's
partner rows) instead of the float32 rows, so a program that needs one sweep never touches the
buffer. Per textbook FLOP the float32 term falls with the column tiles per sweep; holding more
coefficient tiles costs registers that ``ptxas`` counts (tests/compile_for_gpu.py; four tiles spill
at every tile shape tried on sm_90, bench/RESULTS.md). ``tests/traffic_model.py`` gives each
design's bytes.

Normalisation (NORMED): with y = r x, r = 1 / max(|x|, eps), the kernels give dF/dy; the epilogue
kernel takes it back to x, dF/dx = r g - r^3 (g . x) x (r g at or below eps).

Memory: the saved tensors are the inputs and O(N) statistics. The backward allocates one float32
buffer at a time, in which a launch's sweeps keep their partial sums until its last sweep writes the
gradient (with NORMED, the epilogue turns the buffer into the gradient; in place for float32);
after the first gradient, a 16-bit tensor's buffer covers a block of rows at a time
(``ops.LATER_BUFFER_COPIES``), so a SamToNe forward + backward peaks at 3 [N, D] copies beside the
inputs (the two gradients and one buffer of half the rows).

Determinism: every output element is owned by one program, which accumulates it in a fixed order
(read-modify-write of its float32 rows, no atomics, a barrier between sweeps); the first sweep stores
instead of adding, so buffers need no zeroing (and tests poison them with NaN), and a launch can be
repeated on live buffers, as the autotuner does.
"""

from .kernels import AUTOTUNED, INTERPRETING
from .ops import normed_for, prepare_triton, row_lse_backward_op, row_lse_op, row_stats_triton

__all__ = ["AUTOTUNED", "INTERPRETING", "normed_for", "prepare_triton", "row_lse_backward_op", "row_lse_op",
           "row_stats_triton"]
