"""``false_negative_margin``: presumed false negatives dropped by similarity, in every backend against
the reference (the margin sits in a gap between the entries' similarities, so every dtype makes the
same comparisons: ``helpers.margin_in_a_gap``), and its edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import (
    DEVICE,
    Case,
    assert_reference_grads_match_finite_differences,
    cases,
    margin_in_a_gap,
    run_and_compare,
)
from samtone_kernels import fused_samtone_loss
from samtone_kernels._contract import Rows
from samtone_kernels._options import check_options

triton = pytest.importorskip("triton")
from samtone_kernels import _triton  # noqa: E402  (after the interpreter switch in conftest)
from samtone_kernels._triton import hybrid  # noqa: E402

KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
pytestmark = pytest.mark.usefixtures("exact_float32")  # (tests/conftest.py)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(_triton.launch, "POISON_OUTPUTS", True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@settings(max_examples=25)
@given(case=cases(margin=True), tensor_temperature=st.booleans())
def test_torch_backend_with_a_margin(dtype, case, tensor_temperature):
    run_and_compare(case, dtype, "torch", tensor_temperature)


@pytest.mark.parametrize("backend", ["triton", "hybrid"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@settings(max_examples=8 if DEVICE.type == "cpu" else None)
@given(case=cases(max_n=19, max_d=20, max_h=2, margin=True), tensor_temperature=st.booleans())
def test_kernels_with_a_margin(backend, dtype, case, tensor_temperature):
    run_and_compare(case, dtype, backend, tensor_temperature)


@pytest.mark.parametrize("seed", range(3))
def test_reference_with_a_margin_matches_finite_differences(seed):
    rng = np.random.default_rng(seed)
    q, d, n = rng.standard_normal((5, 3)), rng.standard_normal((5, 3)), rng.standard_normal((5, 1, 3))
    options = dict(temperature=0.7, directions=("q2d", "q2q", "d2q", "d2d"), normalize=seed == 2)
    options["false_negative_margin"] = margin_in_a_gap(Case(q, d, n, None, dict(options)), 0.5)
    assert_reference_grads_match_finite_differences(q, d, n, options)


@pytest.mark.parametrize("backend", ["torch", "triton", "hybrid"])
def test_a_margin_below_everything_leaves_the_positives_alone(backend):
    """With m far below every similarity each InfoNCE softmax holds only its positive (never
    dropped): the loss is 0 and so is every gradient; the symmetric one keeps d2q's positive too."""
    g = torch.Generator().manual_seed(0)
    q, d = (torch.randn(9, 6, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    n = torch.randn(9, 2, 6, generator=g).to(DEVICE).requires_grad_()
    for directions in [("q2d",), ("q2d", "d2q"), ("q2d", "q2q", "d2q", "d2d")]:
        loss = fused_samtone_loss(q, d, n, directions=directions, false_negative_margin=-100.0, backend=backend)
        if directions != ("q2d", "q2q", "d2q", "d2d"):
            torch.testing.assert_close(loss, torch.zeros_like(loss), atol=1e-5, rtol=0)
            for grad in torch.autograd.grad(loss, [q, d, n], allow_unused=True):
                assert grad is None or float(grad.abs().max()) < 1e-5
        else:  # q2q and d2d hold no positive: every entry is dropped, the log-partitions keep the positives
            assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", ["triton", "hybrid"])
def test_a_gathered_slice_with_a_margin_matches_torch(backend):
    """Anchors 5 .. 15 of 19 candidates (one rank's slice): the thresholds are per global pair."""
    from samtone_kernels._torch_impl import row_stats_torch

    row_stats = _triton.row_stats_triton if backend == "triton" else hybrid.row_stats_hybrid
    options = check_options(
        directions=("q2d", "q2q", "d2q", "d2d"),
        partition="per_anchor",
        doc_anchor_weight=1.0,
        normalize=False,
        reduction="mean",
        false_negative_margin=0.25,
    )
    groups = torch.tensor([0, 1, 2, 0, 3, 4, 1, 5, 6, 7, 2, 8, 9, 0, 10, 11, 12, 13, 14], device=DEVICE)
    results = []
    for stats_of in (row_stats, row_stats_torch):
        gen = torch.Generator().manual_seed(3)
        q, d = (torch.randn(19, 13, generator=gen).to(DEVICE).requires_grad_() for _ in range(2))
        n = torch.randn(19, 2, 13, generator=gen).to(DEVICE).requires_grad_()
        scale = torch.tensor(4.0, device=DEVICE, requires_grad=True)
        lse, pos = stats_of(Rows(q[5:16], d[5:16], q, d, n, scale, groups, 5), options)
        stats = torch.cat([lse, pos[None]])
        weights = torch.linspace(-0.5, 1.5, stats.numel(), device=DEVICE).view_as(stats)
        results.append([stats.detach(), *torch.autograd.grad((stats * weights).sum(), [q, d, n, scale])])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_older_gpus_compute_a_margin_by_the_hybrid_path(monkeypatch):
    """On GPUs older than ``configs.MARGIN_MIN_ARCH`` the fused backward with a margin would spill, so
    backend="triton" hands such calls to the hybrid path, preparation included (the fused path
    normalises in its kernels, the hybrid path into copies): forced here on CPU, the result is the
    hybrid path's, and both equal the torch backend."""
    from types import SimpleNamespace

    from samtone_kernels._triton import ops

    monkeypatch.setattr(ops, "running_arch", lambda: 80)
    assert ops._margin_by_hybrid(SimpleNamespace(false_negative_margin=0.1), SimpleNamespace(is_cuda=True))
    monkeypatch.setattr(ops, "running_arch", lambda: 90)
    assert not ops._margin_by_hybrid(SimpleNamespace(false_negative_margin=0.1), SimpleNamespace(is_cuda=True))
    monkeypatch.setattr(ops, "_margin_by_hybrid", lambda options, x: options.false_negative_margin is not None)
    calls = []
    stats = ops.row_stats_hybrid
    monkeypatch.setattr(ops, "row_stats_hybrid", lambda *a: calls.append(1) or stats(*a))
    gen = torch.Generator().manual_seed(0)
    q, d = (torch.randn(10, 6, generator=gen).to(DEVICE) for _ in range(2))
    kwargs = dict(directions=("q2d", "q2q", "d2q"), normalize=True, false_negative_margin=0.1)
    routed = fused_samtone_loss(q, d, backend="triton", **kwargs)
    assert calls == [1]
    torch.testing.assert_close(routed, fused_samtone_loss(q, d, backend="torch", **kwargs), rtol=1e-5, atol=1e-5)
