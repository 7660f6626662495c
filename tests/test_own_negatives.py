"""``hard_negative_scope="own"``: each query's hard negatives are its candidates alone (a per-row
segment of N x H logits, ``samtone_kernels._own``), in every backend against the reference, which
writes the scope as masks over the shared layout; and what the backends' kernels are spared."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import DEVICE, cases, run_and_compare
from samtone_kernels import SamToNeLoss, fused_samtone_loss

triton = pytest.importorskip("triton")

KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
pytestmark = pytest.mark.usefixtures("exact_float32")  # (tests/conftest.py)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@settings(max_examples=20)
@given(case=cases(own=True), margin=st.booleans(), tensor_temperature=st.booleans())
def test_torch_backend_with_own_hard_negatives(dtype, case, margin, tensor_temperature):
    run_and_compare(case, dtype, "torch", tensor_temperature)


@given(case=cases(own=True, margin=True))
@settings(max_examples=15)
def test_torch_backend_with_own_hard_negatives_and_a_margin(case):
    run_and_compare(case, torch.float64, "torch", tensor_temperature=True)


@pytest.mark.parametrize("backend", ["triton", "hybrid"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@settings(max_examples=4 if DEVICE.type == "cpu" else None)
@given(case=cases(max_n=19, max_d=20, max_h=2, own=True), tensor_temperature=st.booleans())
def test_kernels_with_own_hard_negatives(backend, dtype, case, tensor_temperature):
    run_and_compare(case, dtype, backend, tensor_temperature)


def test_the_kernels_never_see_own_hard_negatives():
    """The fused kernels do the in-batch work alone: the same matmul FLOPs as without hard negatives
    (the N x H logits are row-wise dots beside them, not N x N H columns)."""
    from tools.kernel_analysis.counting import count_kernel_work

    g = torch.Generator().manual_seed(0)
    q, d = (torch.randn(32, 16, generator=g).requires_grad_() for _ in range(2))
    n = torch.randn(32, 3, 16, generator=g).requires_grad_()
    flops = {}
    for name, negatives, scope in (("own", n, "own"), ("none", None, "shared"), ("shared", n, "shared")):
        with count_kernel_work() as counts:
            loss = fused_samtone_loss(q, d, negatives, backend="triton", hard_negative_scope=scope)
            torch.autograd.grad(loss, [q, d] + ([negatives] if negatives is not None else []))
        flops[name] = counts.flops
    assert flops["own"] == flops["none"] < flops["shared"]


def test_the_scope_without_hard_negatives_warns_and_changes_nothing():
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    with pytest.warns(UserWarning, match="hard_negative_scope='own' has no effect"):
        own = fused_samtone_loss(q, d, hard_negative_scope="own", backend="torch")
    torch.testing.assert_close(own, fused_samtone_loss(q, d, backend="torch"))
    with pytest.raises(ValueError, match="hard_negative_scope: expected one of"):
        fused_samtone_loss(q, d, hard_negative_scope="mine")
    with pytest.raises(ValueError, match="hard_negative_scope"):
        SamToNeLoss(hard_negative_scope="per_row")
    assert SamToNeLoss(hard_negative_scope="own").hard_negative_scope == "own"


def test_own_hard_negatives_with_non_finite_input_give_nan():
    q, d, n = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 2, 3)
    n[2, 1, 0] = float("inf")
    assert torch.isnan(fused_samtone_loss(q, d, n, hard_negative_scope="own", backend="torch"))
