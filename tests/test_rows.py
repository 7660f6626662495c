"""normalize_rows: the fused path's memory-light normalisation against F.normalize and float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import DEVICE
from samtone_kernels import _rows
from samtone_kernels._constants import NORM_EPS
from samtone_kernels._rows import normalize_rows, row_chunks


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Several chunks even at test sizes, so the chunk boundaries are exercised."""
    monkeypatch.setattr(_rows, "CHUNK_ELEMENTS", 24)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@settings(max_examples=20, deadline=None)
@given(n_rows=st.integers(1, 13), dim=st.integers(1, 11), seed=st.integers(0, 2**16), hard=st.booleans())
def test_values_and_gradient_match_f_normalize(dtype, n_rows, dim, seed, hard):
    g = torch.Generator().manual_seed(seed)
    shape = (n_rows, 2, dim) if hard else (n_rows, dim)
    x = (torch.randn(shape, generator=g) * 3).to(DEVICE, dtype)
    if dtype in (torch.float32, torch.float64):
        x[0] = 0.0  # a zero row: the divisor is eps, the gradient g / eps (past the 16-bit range)
    upstream = torch.randn(shape, generator=g).to(DEVICE, dtype)

    ours_x = x.clone().requires_grad_()
    ours = normalize_rows(ours_x)
    ours.backward(upstream)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    theirs_x = x.clone().requires_grad_()
    theirs = F.normalize(theirs_x.to(acc), dim=-1, eps=NORM_EPS).to(dtype)
    theirs.backward(upstream)

    assert ours.dtype == dtype and ours_x.grad.dtype == dtype
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)  # the same float32 arithmetic
    # The gradient is computed in float32 either way, by a different formula: rounding only.
    ref_x = x.double().requires_grad_()
    F.normalize(ref_x, dim=-1, eps=NORM_EPS).backward(upstream.double())
    scale = ref_x.grad.abs().max().item() + 1.0
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2) * scale
    for grad in (ours_x.grad, theirs_x.grad):
        assert (grad.double() - ref_x.grad).abs().max().item() <= tol


def test_non_finite_rows_stay_non_finite():
    x = torch.ones(4, 3, device=DEVICE)
    x[1, 0] = float("nan")
    x[2, 1] = float("inf")
    y = normalize_rows(x)
    assert torch.isnan(y[1]).all() and torch.isnan(y[2, 1])
    torch.testing.assert_close(y[[0, 3]], torch.full((2, 3), 3**-0.5, device=DEVICE))


def test_row_chunks_cover_every_row_once():
    for n_rows, per_row in [(1, 1), (7, 5), (10, 24), (10, 25), (3, 100)]:
        x = torch.empty(n_rows, per_row)
        covered = torch.cat([torch.arange(n_rows)[c] for c in row_chunks(x)])
        assert covered.tolist() == list(range(n_rows))
        assert all(x[c].numel() <= max(24, per_row) for c in row_chunks(x))
