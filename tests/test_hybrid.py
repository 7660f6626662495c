"""The hybrid backend (GEMMs by torch into float32 logit chunks, Triton epilogues) against the reference
(CPU: the epilogues under TRITON_INTERPRET=1, the GEMMs by torch), its chunks, its custom op, and the
work it executes: matmul FLOPs against the textbook count, epilogue bytes per logit.

Every test here runs with poisoned outputs: each buffer the epilogues must write is filled with NaN
before launch, so an element they skip shows up as NaN.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import DEVICE, DIRECTION_SETS, JOINT_ONLY_SETS, Case, cases, run_and_compare
from samtone_kernels import _plan, fused_samtone_loss
from samtone_kernels._contract import Rows
from samtone_kernels._options import check_options
from samtone_kernels._rows import prefix_inverse_norms

triton = pytest.importorskip("triton")
from samtone_kernels import _triton  # noqa: E402  (after the interpreter switch in conftest)
from samtone_kernels._triton import hybrid  # noqa: E402

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
pytestmark = pytest.mark.usefixtures("exact_float32")  # (tests/conftest.py)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(_triton.launch, "POISON_OUTPUTS", True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=10 if DEVICE.type == "cpu" else None)
@given(case=cases(max_n=29, max_d=24, max_h=2), tensor_temperature=st.booleans())
def test_hybrid_matches_reference(dtype, case, tensor_temperature):
    """Values and every gradient: every option the cases draw (directions, partitions, groups with
    ties, hardness, hard negatives, normalisation, temperatures), one chunk."""
    run_and_compare(case, dtype, "hybrid", tensor_temperature)


@settings(max_examples=10 if DEVICE.type == "cpu" else None)
@given(case=cases(max_n=9, max_d=8, max_h=2), tensor_temperature=st.booleans(), rows=st.integers(1, 4))
def test_hybrid_chunks_match_reference(case, tensor_temperature, rows):
    """A budget of 1 to 4 anchor rows per chunk: the column partials merged across chunks (d2q) and
    the gradients accumulated across them."""
    run_and_compare(case, torch.float32, "hybrid", tensor_temperature, chunk_bytes=rows * case.q.shape[0] * 8)


@pytest.mark.parametrize("directions", DIRECTION_SETS + JOINT_ONLY_SETS, ids="-".join)
def test_hybrid_every_direction_set_with_ties(directions):
    """Each direction set once, deterministically: hard negatives, group ids with ties, duplicated
    rows, hardness, three chunks."""
    rng = np.random.default_rng(len(directions))
    n_pairs, dim, n_hard = 21, 19, 2
    q, d = rng.standard_normal((n_pairs, dim)), rng.standard_normal((n_pairs, dim))
    q[5], d[5] = q[2], d[2]
    joint = directions in JOINT_ONLY_SETS or len(directions) % 2 == 1
    options = dict(
        temperature=0.2,
        directions=directions,
        partition="joint" if joint else "per_anchor",
        normalize=True,
        doc_anchor_weight=0.3 if not joint and "d2q" in directions else 1.0,
        hardness_mode="all_negatives",
        hardness_strength=1.5,
    )
    case = Case(q, d, rng.standard_normal((n_pairs, n_hard, dim)), rng.integers(0, 5, n_pairs), options)
    run_and_compare(case, torch.float32, "hybrid", tensor_temperature=True, chunk_bytes=8 * n_pairs * 8)


def _slice_stats_agree(**options):
    """The statistics and every gradient of the hybrid and torch backends' ``row_stats`` for anchors
    that are pairs 5 .. 15 of 19 candidates (one rank's slice of a gathered batch), with groups, hard
    negatives and chunks of 3 rows."""
    from samtone_kernels._torch_impl import row_stats_torch

    options = check_options(partition="per_anchor", doc_anchor_weight=1.0, reduction="mean", **options)
    groups = torch.tensor([0, 1, 2, 0, 3, 4, 1, 5, 6, 7, 2, 8, 9, 0, 10, 11, 12, 13, 14], device=DEVICE)
    results = []
    for row_stats in (hybrid.row_stats_hybrid, row_stats_torch):
        g = torch.Generator().manual_seed(3)
        q, d = (torch.randn(19, 13, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
        n = torch.randn(19, 2, 13, generator=g).to(DEVICE).requires_grad_()
        scale = torch.tensor(4.0, device=DEVICE, requires_grad=True)
        lse, pos = row_stats(Rows(q[5:16], d[5:16], q, d, n, scale, groups, 5), options)
        stats = torch.cat([lse.flatten(0, -2), pos.flatten(0, -2) if pos.dim() > 1 else pos[None]])
        weights = torch.linspace(-0.5, 1.5, stats.numel(), device=DEVICE).view_as(stats)
        results.append([stats.detach(), *torch.autograd.grad((stats * weights).sum(), [q, d, n, scale])])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("directions", [("q2d",), ("q2d", "d2q"), ("q2d", "q2q", "d2q", "d2d")], ids="-".join)
def test_hybrid_anchor_slice_with_offset_matches_torch(directions):
    """A gathered batch's slice (``_slice_stats_agree``) with hardness: equal to the torch backend."""
    _slice_stats_agree(
        directions=directions,
        normalize=False,
        hardness_mode="in_batch_negatives",
        hardness_strength=2.0,
        chunk_bytes=3 * 19 * 8,
    )


def test_hybrid_matryoshka_slice_with_a_margin_matches_torch():
    """Matryoshka prefixes in one pass, each normalised by its own norms (their gradients through the
    inverse norms), with the margin (per prefix thresholds) and hardness, on a gathered batch's slice
    in chunks of 3 rows (each row costs its K prefixes' tiles): equal to the torch backend."""
    dims = (2, 5, 13)
    _slice_stats_agree(
        directions=("q2d", "q2q", "d2q", "d2d"),
        normalize=True,
        hardness_mode="all_negatives",
        hardness_strength=0.5,
        false_negative_margin=0.05,
        matryoshka_dims=dims,
        chunk_bytes=3 * 19 * 8 * len(dims),
    )


def test_hybrid_custom_op_opcheck():
    """torch.library.opcheck: schema, fake implementation and autograd registration agree."""
    g = torch.Generator().manual_seed(0)
    q, d = (torch.randn(11, 9, generator=g).to(DEVICE) for _ in range(2))
    n = torch.randn(11, 1, 9, generator=g).to(DEVICE)
    scale = torch.tensor(5.0, device=DEVICE, requires_grad=True)
    groups = torch.tensor([0, 1, 0, 2, 3, 1, 4, 5, 6, 7, 0], device=DEVICE)

    def norms(dims, *xs):
        return [None if x is None else prefix_inverse_norms(x, dims).requires_grad_() for x in xs]

    for args in [
        (q, d, None, None, n, groups, scale, 0, "q2d,q2q,d2q,d2d", 0.0, "", 1 << 30),
        (q, d, q, d, n, groups, scale, 0, "q2d,q2q,d2q,d2d", 1.0, "all_negatives", 300),
        (q[2:7], d[2:7], q, d, None, None, scale, 2, "q2d,q2q", 0.0, "", 1 << 30),
        # Matryoshka prefixes, each normalised: the inverse prefix norms are inputs with gradients
        (
            q,
            d,
            None,
            None,
            n,
            groups,
            scale,
            0,
            "q2d,q2q,d2q,d2d",
            0.0,
            "",
            400,
            0.1,
            [3, 9],
            *norms((3, 9), q, d, None, None, n),
        ),
        (
            q[2:7],
            d[2:7],
            q,
            d,
            n,
            None,
            scale,
            2,
            "q2d,d2q",
            0.0,
            "",
            1 << 30,
            None,
            [4, 9],
            *norms((4, 9), q[2:7], d[2:7], q, d, n),
        ),
    ]:
        torch.library.opcheck(
            hybrid.hybrid_row_lse_op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration")
        )


# Executed / textbook matmul work, counted by torch's FLOP counter (one forward + backward, the
# candidates being the anchors): the targets of the hybrid design.
WORK_TARGETS = {("q2d",): 1.34, ("q2d", "q2q"): 1.17, ("q2d", "d2q"): 0.67, ("q2d", "q2q", "d2q", "d2d"): 0.84}


def _textbook(directions, n_pairs, dim, n_hard):
    return sum(
        3 * 2 * n_pairs * n_pairs * dim * (n_hard if b.segment == "n" else 1) for b in _plan.selected(directions)
    )


@pytest.mark.parametrize("directions", list(WORK_TARGETS), ids="-".join)
@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "chunks"])
def test_hybrid_matmul_work(monkeypatch, directions, chunked):
    """Every GEMM the hybrid path runs goes through ``hybrid.mm_f32`` (inside its custom ops, where
    torch's FLOP counter cannot see): counted there, 2 M N K each."""
    flops = []
    mm = hybrid.mm_f32

    def counted(a, b, out=None):
        flops.append(2 * a.shape[0] * a.shape[1] * b.shape[1])
        return mm(a, b, out=out)

    monkeypatch.setattr(hybrid, "mm_f32", counted)
    n_pairs, dim = 32, 16
    g = torch.Generator().manual_seed(0)
    q, d = (torch.randn(n_pairs, dim, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    budget = 8 * n_pairs * 8 if chunked else None
    loss = fused_samtone_loss(q, d, directions=directions, backend="hybrid", chunk_bytes=budget)
    torch.autograd.grad(loss, [q, d])
    ratio = sum(flops) / _textbook(directions, n_pairs, dim, 0)
    print(f"hybrid executed / textbook matmul work {'-'.join(directions)}: {ratio:.3f}")
    assert len(flops) >= 3 * (1 + 3 * chunked)  # the count sees the GEMMs: at least one tile, 3 GEMMs per chunk
    assert ratio <= WORK_TARGETS[directions], ratio


@pytest.mark.parametrize("directions", [("q2d",), ("q2d", "q2q", "d2q", "d2d")], ids="-".join)
def test_hybrid_matryoshka_matmul_work(monkeypatch, directions):
    """Matryoshka dims (D/8, D/4, D/2, D) in one pass: exactly the matmul work of the single full-D
    loss (one GEMM per slice of D where the plain loss runs one over D; the norms need none), counted
    at every GEMM the path runs (``mm_f32`` and the running sums' ``addmm_f32_``), where a loss per
    prefix costs 1.875x (the issue asks at most 1.35x)."""
    flops = []
    mm, addmm = hybrid.mm_f32, hybrid.addmm_f32_

    def counted_mm(a, b, out=None):
        flops.append(2 * a.shape[0] * a.shape[1] * b.shape[1])
        return mm(a, b, out=out)

    def counted_addmm(acc, a, b):
        flops.append(2 * a.shape[0] * a.shape[1] * b.shape[1])
        return addmm(acc, a, b)

    monkeypatch.setattr(hybrid, "mm_f32", counted_mm)
    monkeypatch.setattr(hybrid, "addmm_f32_", counted_addmm)
    g = torch.Generator().manual_seed(0)
    q, d = (torch.randn(32, 64, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    counts = []
    for dims in (None, (8, 16, 32, 64)):
        flops.clear()
        loss = fused_samtone_loss(q, d, directions=directions, backend="hybrid", normalize=True, matryoshka_dims=dims)
        torch.autograd.grad(loss, [q, d])
        counts.append(sum(flops))
    print(f"hybrid Matryoshka / single-loss matmul work {'-'.join(directions)}: {counts[1] / counts[0]:.3f}")
    assert counts[0] > 0 and counts[1] == counts[0], counts


@pytest.mark.skipif(DEVICE.type != "cpu", reason="counts under the interpreter")
@pytest.mark.parametrize("directions", [("q2d", "q2q"), ("q2d", "q2q", "d2q", "d2d")], ids="-".join)
def test_hybrid_epilogue_bytes_per_logit(monkeypatch, directions):
    """The epilogues' own loads and stores per logit of their pass, float16, at the GPU tile: <= 4.5
    bytes forward (read the float32 logits once), <= 6.5 backward (and write G in float16)."""
    from tools.kernel_analysis.counting import count_kernel_work

    monkeypatch.setattr(hybrid, "_INTERPRETER_TILE", dict(hybrid.EPILOGUE_TILE))
    n_pairs, dim, n_hard = 256, 32, 1
    g = torch.Generator().manual_seed(0)
    q, d = (torch.randn(n_pairs, dim, generator=g).half().requires_grad_() for _ in range(2))
    n = torch.randn(n_pairs, n_hard, dim, generator=g).half().requires_grad_()
    logits = sum(
        n_pairs * n_pairs * (n_hard if seg == "n" else 1)
        for _, seg, _ in hybrid.pairs(directions, True, False, None, True)
    )
    with count_kernel_work() as counts:
        loss = fused_samtone_loss(q, d, n, directions=directions, backend="hybrid")
        torch.autograd.grad(loss, [q, d, n])
    per_logit = {name: (row["load_bytes"] + row["store_bytes"]) / logits for name, row in counts.per_kernel.items()}
    print(f"hybrid epilogue bytes per logit {'-'.join(directions)}: {per_logit}")
    assert per_logit["lse_partials_kernel"] <= 4.5, per_logit
    assert per_logit["coefficient_kernel"] <= 6.5, per_logit


def test_hybrid_float64_is_refused():
    q = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='hybrid'"):
        fused_samtone_loss(q, q, backend="hybrid")
