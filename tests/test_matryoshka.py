"""Matryoshka in one call (``matryoshka_dims``): every backend against the reference's sum of prefix
losses, the torch backend's matmul work against the single full-D loss, and the bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import reference
from helpers import DEVICE, assert_grad_close, assert_loss_close, cases
from samtone_kernels import SamToNeLoss, fused_samtone_loss

KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
pytestmark = pytest.mark.usefixtures("exact_float32")  # (tests/conftest.py)


@st.composite
def prefixes(draw, dim: int):
    """Strictly increasing dims ending at D (a single prefix included), weights or None."""
    inner = draw(st.lists(st.integers(1, max(1, dim - 1)), max_size=3, unique=True)) if dim > 1 else []
    dims = tuple(sorted(inner)) + (dim,)
    weights = draw(
        st.one_of(st.none(), st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=len(dims), max_size=len(dims)))
    )
    return dims, None if weights is None else tuple(weights)


def _compare(case, dims, weights, dtype, backend, tensor_temperature):
    """Loss and gradients of ``backend`` against ``reference.matryoshka_*`` on the rounded inputs;
    the budgets of one loss, times the total weight (each prefix's errors add)."""
    if case.options.get("normalize"):
        # A prefix far shorter than its vector is ill-conditioned to normalise (its gradient is 1 / |x[:m]|
        # times a cancellation); the budgets assume norms of the vectors' size, as ``cases`` keeps them.
        xs = [case.q, case.d] + ([] if case.n is None else [case.n.reshape(-1, case.q.shape[1])])
        for x in xs:
            full = np.linalg.norm(x, axis=-1)
            assume(all((np.linalg.norm(x[:, :m], axis=-1) >= 0.2 * full).all() for m in dims))
    case = case.rounded(dtype)
    q, d, n, kwargs = case.torch_inputs(dtype, tensor_temperature=tensor_temperature)
    loss = fused_samtone_loss(q, d, n, backend=backend, matryoshka_dims=dims, matryoshka_weights=weights, **kwargs)
    options = {**case.options}
    ref = dict(group_ids=case.group_ids, matryoshka_dims=dims, matryoshka_weights=weights, **options)
    total = float(sum(weights)) if weights is not None else float(len(dims))
    tol = dict(renormalized=backend in ("triton", "hybrid"))
    expected_loss = reference.matryoshka_loss(case.q, case.d, case.n, **ref)
    assert_loss_close(loss / max(total, 1.0), np.asarray(expected_loss) / max(total, 1.0), dtype, case, **tol)
    loss.sum().backward()
    grads = reference.matryoshka_grad(case.q, case.d, case.n, **ref)
    scaled = max(total, 1.0)
    assert_grad_close("queries", q.grad / scaled, grads["queries"] / scaled, dtype, case, **tol)
    assert_grad_close("docs", d.grad / scaled, grads["docs"] / scaled, dtype, case, **tol)
    if n is not None:
        assert_grad_close("hard_negatives", n.grad / scaled, grads["hard_negatives"] / scaled, dtype, case, **tol)
    if tensor_temperature:
        got = kwargs["temperature"].grad / scaled
        assert_grad_close("temperature", got, grads["temperature"] / scaled, dtype, case, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@settings(max_examples=25)
@given(data=st.data(), case=cases(max_d=11), tensor_temperature=st.booleans())
def test_torch_backend_matches_the_sum_of_prefix_losses(dtype, data, case, tensor_temperature):
    dims, weights = data.draw(prefixes(case.q.shape[1]))
    _compare(case, dims, weights, dtype, "torch", tensor_temperature)


@settings(max_examples=10)
@given(data=st.data(), case=cases(max_d=11, margin=True))
def test_torch_backend_with_a_margin_and_own_hard_negatives(data, case):
    """The margin compares each prefix's own similarities; own hard negatives are truncated too."""
    dims, weights = data.draw(prefixes(case.q.shape[1]))
    if case.n is not None:
        case.options["hard_negative_scope"] = data.draw(st.sampled_from(["shared", "own"]))
    _compare(case, dims, weights, torch.float64, "torch", tensor_temperature=False)


@pytest.mark.parametrize("backend", ["triton", "hybrid"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@settings(max_examples=3 if DEVICE.type == "cpu" else None)
@given(data=st.data(), case=cases(max_n=17, max_d=20, max_h=1))
def test_kernel_backends_match_the_sum_of_prefix_losses(backend, dtype, data, case):
    pytest.importorskip("triton")
    dims, weights = data.draw(prefixes(case.q.shape[1]))
    _compare(case, dims, weights, dtype, backend, tensor_temperature=False)


@pytest.mark.parametrize("backend", ["torch", "hybrid"])
def test_a_single_prefix_is_the_plain_loss(backend):
    """dims = (D,): the plain loss, values and gradients (the hybrid path normalises it through the
    prefix norms inside its epilogues, the plain call through normalised copies)."""
    if backend == "hybrid":
        pytest.importorskip("triton")
    g = torch.Generator().manual_seed(0)
    q, d, n = torch.randn(9, 7, generator=g), torch.randn(9, 7, generator=g), torch.randn(9, 2, 7, generator=g)
    q, d, n = (x.to(DEVICE).requires_grad_() for x in (q, d, n))
    for kwargs in (dict(), dict(normalize=True, directions=("q2d", "q2q", "d2q", "d2d"))):
        plain = fused_samtone_loss(q, d, n, backend=backend, **kwargs)
        grads = torch.autograd.grad(plain, [q, d, n])
        one = fused_samtone_loss(q, d, n, backend=backend, matryoshka_dims=(7,), **kwargs)
        torch.testing.assert_close(one, plain)
        for got, want in zip(torch.autograd.grad(one, [q, d, n]), grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        halves = fused_samtone_loss(q, d, n, backend=backend, matryoshka_dims=(7,), matryoshka_weights=(0.5,), **kwargs)
        torch.testing.assert_close(halves, 0.5 * plain)


@pytest.mark.parametrize("backend", ["torch", "hybrid"])
def test_a_prefix_of_zeros_has_the_reference_gradient(backend):
    """A row whose first prefix is all zeros, normalised: its norm is the constant eps there (the
    reference's branch), so its gradient is finite and the reference's, not NaN."""
    if backend == "hybrid":
        pytest.importorskip("triton")
    dtype = torch.float64 if backend == "torch" else torch.float32
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64)
    q[1, :3] = 0
    expected = reference.matryoshka_grad(q.numpy(), d.numpy(), normalize=True, matryoshka_dims=(3, 6))["queries"]
    q = q.to(DEVICE, dtype).requires_grad_()
    fused_samtone_loss(q, d.to(DEVICE, dtype), normalize=True, matryoshka_dims=(3, 6), backend=backend).backward()
    got = q.grad.double().cpu().numpy()
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-5 if dtype == torch.float32 else 1e-9, atol=1e-5)


def _gemm_flops(**kwargs) -> int:
    g = torch.Generator().manual_seed(0)
    q, d = (torch.randn(64, 64, generator=g).requires_grad_() for _ in range(2))
    with FlopCounterMode(display=False) as counter:
        loss = fused_samtone_loss(q, d, backend="torch", normalize=True, **kwargs)
        torch.autograd.grad(loss, [q, d])
    return counter.get_total_flops()


@pytest.mark.parametrize("directions", [("q2d",), ("q2d", "q2q"), ("q2d", "q2q", "d2q", "d2d")], ids="-".join)
def test_matryoshka_costs_about_the_matmul_work_of_one_loss(directions):
    """Counted by torch's FLOP counter (forward and backward), dims (D/8, D/4, D/2, D): at most 1.35x
    the single full-D loss (one GEMM per slice of D, the running sums giving every prefix), where a
    loss per prefix, as sentence-transformers' MatryoshkaLoss calls it, costs 1.875x."""
    dims = (8, 16, 32, 64)
    one = _gemm_flops(directions=directions)
    ours = _gemm_flops(directions=directions, matryoshka_dims=dims)
    per_prefix = sum(_gemm_flops(directions=directions) * m / 64 for m in dims)
    assert ours <= 1.35 * one, (ours / one, per_prefix / one)
    assert per_prefix >= 1.8 * one


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(matryoshka_dims=(4, 2, 8)), ValueError, "strictly increasing"),
        (dict(matryoshka_dims=(2, 2, 8)), ValueError, "strictly increasing"),
        (dict(matryoshka_dims=(0, 8)), ValueError, "strictly increasing"),
        (dict(matryoshka_dims=(2, 4)), ValueError, "last dim must be the embeddings' D = 8"),
        (dict(matryoshka_dims=(2, 16)), ValueError, "last dim must be the embeddings' D = 8"),
        (dict(matryoshka_dims=()), TypeError, "non-empty"),
        (dict(matryoshka_dims=(2.5, 8)), TypeError, "ints"),
        (dict(matryoshka_dims=8), TypeError, "sequence"),
        (dict(matryoshka_dims=(4, 8), matryoshka_weights=(1.0,)), ValueError, "one weight per dim"),
        (dict(matryoshka_dims=(4, 8), matryoshka_weights=(1.0, -1.0)), ValueError, ">= 0"),
        (dict(matryoshka_dims=(4, 8), matryoshka_weights=(1.0, float("nan"))), ValueError, ">= 0"),
        (dict(matryoshka_weights=(1.0,)), ValueError, "without matryoshka_dims"),
    ],
)
def test_bad_matryoshka_arguments_raise(kwargs, error, match):
    q, d = torch.randn(3, 8), torch.randn(3, 8)
    with pytest.raises(error, match=match):
        fused_samtone_loss(q, d, **kwargs)


def test_the_module_takes_the_prefixes():
    q, d = torch.randn(5, 6), torch.randn(5, 6)
    module = SamToNeLoss(normalize=True, matryoshka_dims=(3, 6), matryoshka_weights=(1.0, 2.0), backend="torch")
    expected = fused_samtone_loss(q, d, normalize=True, matryoshka_dims=(3, 6), matryoshka_weights=(1.0, 2.0))
    torch.testing.assert_close(module(q, d), expected)
