"""Row-wise helpers of the fused path, written to keep memory at the size of the inputs.

The kernels normalise by scaling logit tiles with one float32 inverse norm per row
(``inverse_norms``). A batch gathered across devices, and float16 inputs, are normalised into a copy
by ``normalize_rows``: autograd through ``F.normalize(x.float()).to(x.dtype)`` would hold a float32
copy of every embedding until the backward, while it saves only its input (which the graph holds
anyway) and one float32 per row.
Everything works in row chunks of bounded size (``row_chunks``), so no full-size float32 temporary
exists.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._constants import NORM_EPS
from ._gemm import HALF

# Elements of one float32 temporary (16 MiB): large enough that chunking costs nothing measurable.
CHUNK_ELEMENTS = 1 << 22


def row_chunks(x: torch.Tensor) -> list[slice]:
    """Slices of dim 0 such that each chunk holds about ``CHUNK_ELEMENTS`` elements."""
    per_row = max(1, x[:1].numel())
    step = max(1, CHUNK_ELEMENTS // per_row)
    return [slice(i, i + step) for i in range(0, x.shape[0], step)]


def _accumulate_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def inverse_norms(x: torch.Tensor) -> torch.Tensor:
    """1 / max(|x|, 1e-12) over the last dim of x [..., D]: [...] in float32 (float64 for float64)."""
    acc = _accumulate_dtype(x)
    out = x.new_empty(x.shape[:-1], dtype=acc)
    for c in row_chunks(x):
        out[c] = 1.0 / torch.linalg.vector_norm(x[c].to(acc), dim=-1).clamp_min(NORM_EPS)
    return out


class _NormalizeRows(torch.autograd.Function):
    """y = x / max(|x|, eps) along the last dim, returned in x's dtype (computed in float32)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        acc = _accumulate_dtype(x)
        norm = x.new_empty((*x.shape[:-1], 1), dtype=acc)
        y = torch.empty_like(x)
        for c in row_chunks(x):
            xc = x[c].to(acc)
            norm[c] = torch.linalg.vector_norm(xc, dim=-1, keepdim=True)
            y[c] = xc / norm[c].clamp_min(NORM_EPS)
        inv = 1.0 / norm.clamp_min(NORM_EPS)
        ctx.save_for_backward(x, inv, norm > NORM_EPS)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        # With r = 1 / |x| (|x| > eps): dy = r (I - y y^T) dx, so dL/dx = r g - r^3 (g . x) x.
        # At or below eps the divisor is the constant eps: dL/dx = g / eps.
        x, inv, above = ctx.saved_tensors
        acc = inv.dtype
        dx = torch.empty_like(x)
        for c in row_chunks(x):
            xc, gc, r = x[c].to(acc), g[c].to(acc), inv[c]
            gx = (gc * xc).sum(-1, keepdim=True)
            dx[c] = r * gc - torch.where(above[c], r**3 * gx, 0.0) * xc
        return dx


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Unit rows ``x / max(|x|, 1e-12)`` of x [..., D] in x's dtype, saving only x and [...] norms.

    The same float32 arithmetic as ``F.normalize(x.float(), dim=-1).to(x.dtype)``.
    """
    return _NormalizeRows.apply(x)


def prefix_inverse_norms(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """[..., K]: 1 / max(|x[..., :m_k]|, eps) for each prefix, from the running sum of squares. The
    clamp comes before the square root, so a prefix of zeros has a zero gradient through its norm (as
    the reference's eps branch), not sqrt's infinite one times 0."""
    squares = (x.float() if x.dtype in HALF else x).square().cumsum(-1)
    return squares[..., [m - 1 for m in dims]].clamp_min(NORM_EPS * NORM_EPS).sqrt().reciprocal()


def prefix_dots(a: torch.Tensor, b: torch.Tensor, dims: tuple[int, ...], normalize: bool) -> torch.Tensor:
    """[K, n]: a_i[:m_k] . b_i[:m_k] for each prefix (cosines with ``normalize``)."""
    if a.dtype in HALF:
        a, b = a.float(), b.float()
    dots = (a * b).cumsum(-1)[..., [m - 1 for m in dims]]  # [n, K]
    if normalize:
        dots = dots * prefix_inverse_norms(a, dims) * prefix_inverse_norms(b, dims)
    return dots.T
