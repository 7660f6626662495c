"""The fused Triton kernel against the reference (CPU: under TRITON_INTERPRET=1; GPU: on the device).

Every test here runs with poisoned outputs: each buffer the kernels must write is filled with NaN
before launch, so an element they skip shows up as NaN.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import harness  # the benchmarks' peak-memory measurement
from helpers import DEVICE, DIRECTION_SETS, Case, cases, run_and_compare
from samtone_kernels import fused_samtone_loss
from samtone_kernels._contract import Rows

triton = pytest.importorskip("triton")
from samtone_kernels import _triton  # noqa: E402  (after the interpreter switch in conftest)

# The interpreter computes bfloat16 tl.dot wrongly; bfloat16 is checked on the GPU only.
ALL_FOUR = ("q2d", "q2q", "d2q", "d2d")
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
pytestmark = pytest.mark.usefixtures("exact_float32")  # (tests/conftest.py)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(_triton.launch, "POISON_OUTPUTS", True)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@settings(max_examples=18 if DEVICE.type == "cpu" else None)
@given(case=cases(max_n=37, max_d=40, max_h=2), tensor_temperature=st.booleans())
def test_kernel_matches_reference(dtype, case, tensor_temperature):
    """Values and every gradient, N and D not multiples of the 16-wide interpreter tiles, N = 1."""
    run_and_compare(case, dtype, "triton", tensor_temperature)


@pytest.mark.parametrize("directions", DIRECTION_SETS, ids="-".join)
@pytest.mark.parametrize("partition", ["per_anchor", "joint"])
def test_kernel_every_direction_set_with_ties(directions, partition):
    """Each direction set and partition once, deterministically: 2 tiles of N, 3 chunks of D,
    hard negatives, group ids with ties, duplicated rows."""
    rng = np.random.default_rng(len(directions))
    n_pairs, dim, n_hard = 23, 37, 2
    q, d = rng.standard_normal((n_pairs, dim)), rng.standard_normal((n_pairs, dim))
    q[5], d[5] = q[2], d[2]
    options = dict(
        temperature=0.2,
        directions=directions,
        partition=partition,
        normalize=True,
        doc_anchor_weight=1.0 if partition == "joint" or "d2q" not in directions else 0.3,
        reduction="mean",
    )
    case = Case(q, d, rng.standard_normal((n_pairs, n_hard, dim)), rng.integers(0, 5, n_pairs), options)
    run_and_compare(case, torch.float32, "triton", tensor_temperature=True)


@pytest.mark.parametrize(
    "directions,partition,hardness_mode",
    [
        (("q2d", "d2d"), "joint", "in_batch_negatives"),
        (("q2d", "q2q", "d2d"), "joint", "hard_negatives"),
        (("q2d", "q2q", "d2q", "d2d"), "per_anchor", "all_negatives"),
        (("q2d", "d2q"), "joint", "all_negatives"),
    ],
    ids=lambda x: "-".join(x) if isinstance(x, tuple) else str(x),
)
def test_kernel_joint_subsets_and_hardness_weighting(directions, partition, hardness_mode):
    """Document anchors without d2q (joint), and the hardness penalty on the q2d softmax, whose tile
    also serves d2q (column role) and the hard negatives' and positives' own launches."""
    rng = np.random.default_rng(len(directions))
    n_pairs, dim, n_hard = 21, 13, 2
    q, d = rng.standard_normal((n_pairs, dim)), rng.standard_normal((n_pairs, dim))
    options = dict(
        temperature=0.2,
        directions=directions,
        partition=partition,
        normalize=True,
        doc_anchor_weight=1.0 if partition == "joint" else 0.3,
        reduction="mean",
        hardness_mode=hardness_mode,
        hardness_strength=4.0,
    )
    case = Case(q, d, rng.standard_normal((n_pairs, n_hard, dim)), rng.integers(0, 5, n_pairs), options)
    run_and_compare(case, torch.float32, "triton", tensor_temperature=True)


@pytest.mark.parametrize(
    "paired,span,resident,transposed,normalize",
    [
        (True, 1, False, False, False),
        (True, 1, False, False, True),
        (False, 1, False, False, False),
        (False, 2, False, False, False),
        (False, 1, True, False, False),
        (False, 1, True, False, True),
        (True, 2, False, True, False),
        (True, 2, False, True, True),
    ],
)
def test_kernel_walk_structures(monkeypatch, paired, span, resident, transposed, normalize):
    """The walks the configs choose between (``configs.GPU_TILES``, ``TRANSPOSED_TILES``,
    ``RESIDENT_TILES``; the interpreter's default is paired with two tiles per lone-segment sweep): Q
    and D paired or each alone, one or two column tiles per sweep, the sweeps' products transposed
    (sm_90's second swept config), or resident (D = 21 within one 32-wide tile, the rows' gradient on
    chip). N = 40 leaves the last two-tile sweep half past the end; hard negatives, groups, the
    hardness penalty, and the gradient written by the last sweep (``normalize=False``) or by the
    epilogue from the buffer (``normalize=True``: for each walk that stores the buffer its own way)."""
    for kernel, grad in zip(_triton.AUTOTUNED, (False, True)):
        kwargs = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16, "PAIRED": paired}
        if grad:
            kwargs.update(SPAN=span, RESIDENT=resident, TRANSPOSED=transposed, BLOCK_D=32 if resident else 16)
        monkeypatch.setattr(kernel, "configs", [triton.Config(kwargs, num_warps=4, num_stages=1)])
        monkeypatch.setattr(kernel, "cache", {})
    rng = np.random.default_rng(span)
    n_pairs, dim, n_hard = 40, 21, 1
    q, d = rng.standard_normal((n_pairs, dim)), rng.standard_normal((n_pairs, dim))
    options = dict(
        temperature=0.2,
        directions=ALL_FOUR,
        partition="per_anchor",
        normalize=normalize,
        doc_anchor_weight=0.3,
        reduction="mean",
        hardness_mode="all_negatives",
        hardness_strength=2.0,
    )
    case = Case(q, d, rng.standard_normal((n_pairs, n_hard, dim)), rng.integers(0, 7, n_pairs), options)
    run_and_compare(case, torch.float32, "triton", tensor_temperature=True)
    options.update(directions=("q2d",), hardness_mode=None, doc_anchor_weight=1.0)  # lone segments only: InfoNCE
    run_and_compare(Case(q, d, case.n, case.group_ids, options), torch.float32, "triton", tensor_temperature=True)


def _inputs(n_pairs=29, dim=19, n_hard=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(*s, generator=g).to(DEVICE, dtype).requires_grad_()
        for s in [(n_pairs, dim), (n_pairs, dim), (n_pairs, n_hard, dim)]
    ]


def _loss_and_grads(q, d, n, **kwargs):
    tau = torch.tensor(0.1, device=DEVICE, requires_grad=True)
    loss = fused_samtone_loss(q, d, n, temperature=tau, backend="triton", **kwargs)
    grads = torch.autograd.grad(loss, [q, d, n, tau])
    return [loss.detach(), *grads]


def test_deterministic_bits():
    q, d, n = _inputs()
    groups = torch.tensor([0, 1, 2] * 9 + [0, 1], device=DEVICE)
    first = _loss_and_grads(q, d, n, directions=ALL_FOUR, group_ids=groups)
    for _ in range(2):
        again = _loss_and_grads(q, d, n, directions=ALL_FOUR, group_ids=groups)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.parametrize("normalize", [False, True])
def test_strided_inputs_match_contiguous(normalize):
    q, d, n = _inputs()
    base = _loss_and_grads(q, d, n, directions=ALL_FOUR, normalize=normalize)
    # Views with non-unit strides everywhere: a column slice, a transposed buffer, a permuted [N, H, D].
    wide = torch.randn(q.shape[0], 3 * q.shape[1], device=DEVICE)
    wide[:, ::3] = q.detach()
    qs = wide[:, ::3].requires_grad_()
    ds = d.detach().t().contiguous().t().requires_grad_()
    ns = n.detach().permute(1, 0, 2).contiguous().permute(1, 0, 2).requires_grad_()
    assert not qs.is_contiguous() and not ds.is_contiguous() and not ns.is_contiguous()
    strided = _loss_and_grads(qs, ds, ns, directions=ALL_FOUR, normalize=normalize)
    for a, b in zip(base, strided):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.fixture
def large_tiles(monkeypatch):
    """64-wide tiles under the interpreter (fewer, larger NumPy steps) for the memory tests at
    N = 128 .. 512: allocations do not depend on the tiles. On the GPU the autotuner's tiles stay."""
    if DEVICE.type == "cpu":
        for kernel in _triton.AUTOTUNED:
            monkeypatch.setattr(
                kernel,
                "configs",
                [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32}, num_warps=4, num_stages=1)],
            )
            monkeypatch.setattr(kernel, "cache", {})


@pytest.mark.usefixtures("large_tiles")
def test_saved_tensors_are_linear_in_n():
    """At N = 512, D = 4 (N^2 = 128 N D) the graph holds O(N D) bytes for backward; eager holds N^2."""
    n_pairs, dim = 512, 4

    def saved_bytes(backend):
        storages = {}  # a tensor saved twice, or a view, holds its storage once

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        q, d, n = _inputs(n_pairs, dim, 1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fused_samtone_loss(
                q,
                d,
                n,
                directions=ALL_FOUR,
                normalize=True,
                backend=backend,
                group_ids=torch.arange(n_pairs, device=DEVICE) % 7,
            )
        return sum(storages.values())

    embeddings = 4 * n_pairs * dim * 3  # q, d, n in float32
    assert saved_bytes("triton") <= embeddings + 64 * n_pairs  # the inputs and row statistics
    assert saved_bytes("torch") >= 4 * n_pairs * n_pairs  # the check can fail: eager holds N x N blocks


def _peak_bytes_per_backend(monkeypatch, inputs, directions) -> dict[str, int]:
    """Peak allocation of forward + backward with normalisation, per backend, measured with torch's
    allocation events (bench/harness.py). Row chunks are made small, as they are relative to the
    embeddings at large N. The interpreter leaves reference cycles that hold a launch's tensors until
    Python's cycle collector runs, so on CPU every launch is followed by a collection of the two young
    generations, where a launch's own cycles live (a full collection gives the same figures at twice
    the time; on the GPU no interpreter is involved)."""
    from samtone_kernels import _rows

    monkeypatch.setattr(_rows, "CHUNK_ELEMENTS", inputs[0].numel() // 16)
    if DEVICE.type == "cpu":
        import gc

        from triton.runtime import interpreter

        launch = interpreter.GridExecutor.__call__

        def launch_and_collect(self, *args, **kwargs):
            launch(self, *args, **kwargs)
            gc.collect(1)

        monkeypatch.setattr(interpreter.GridExecutor, "__call__", launch_and_collect)
    peaks = {}
    for backend in ("triton", "torch"):

        def step(backend=backend):
            loss = fused_samtone_loss(*inputs, directions=directions, normalize=True, backend=backend)
            return torch.autograd.grad(loss, inputs)

        step()
        peaks[backend] = harness.peak_memory_bytes(step, DEVICE.type)
    return peaks


@pytest.mark.usefixtures("large_tiles")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_peak_memory_stays_at_a_few_copies_of_the_embeddings(monkeypatch, dtype):
    """Forward + backward with normalisation at N = 128, D = 32 (N^2 = 4 N D): the fused path's peak
    allocation is a few copies of the embeddings, the eager path's holds N x N blocks, in [N, D]
    copies of the input dtype (``_peak_bytes_per_backend``)."""
    n_pairs, dim = 128, 32
    copy = n_pairs * dim * dtype.itemsize
    buffer = n_pairs * dim * 4 // copy  # copies in one float32 buffer
    q, d, n = _inputs(n_pairs, dim, 1, dtype=dtype)
    for directions, inputs in [(("q2d", "q2q"), [q, d]), (ALL_FOUR, [q, d, n])]:
        peaks = _peak_bytes_per_backend(monkeypatch, inputs, directions)
        # By construction: float32 normalises inside the kernels, so the peak is the gradients (which
        # are the float32 buffers); float16 normalises into a copy (one per input), then holds the
        # gradients and one float32 buffer. Beyond that, O(N) vectors (statistics, norms, per-row
        # dots: each 1/16 of a float16 copy at D = 32).
        expected = len(inputs) if dtype == torch.float32 else 2 * len(inputs) + buffer
        print(
            f"peak copies {dtype} {'-'.join(directions)}: fused {peaks['triton'] / copy:.1f}, "
            f"eager {peaks['torch'] / copy:.1f}"
        )  # the figures in bench/RESULTS.md (pytest -s)
        assert peaks["triton"] <= (expected + 1.25) * copy, (directions, peaks["triton"] / copy)
        assert peaks["torch"] >= 5 * peaks["triton"], (directions, peaks)


@pytest.mark.usefixtures("large_tiles")
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the wrong bf16 dots' values
def test_bfloat16_samtone_peak_is_three_copies(monkeypatch):
    """bfloat16 normalises inside the kernels; the backward holds the first gradient's float32 buffer
    whole, the later ones half their rows at a time (``launch.LATER_BUFFER_COPIES``): beside the inputs,
    the peak of SamToNe is the two gradients and one copy's worth of buffer, 3 [N, D] bfloat16 copies
    (plus O(N) vectors, 1/64 of a copy each at D = 128). Only allocations are measured: the
    interpreter's bfloat16 dots are wrong, but their buffers are the GPU's."""
    n_pairs, dim = 128, 128
    copy = n_pairs * dim * 2
    q, d = _inputs(n_pairs, dim, 1, dtype=torch.bfloat16)[:2]
    peaks = _peak_bytes_per_backend(monkeypatch, [q, d], ("q2d", "q2q"))
    print(f"peak copies bfloat16 q2d-q2q: fused {peaks['triton'] / copy:.2f}")  # bench/RESULTS.md (pytest -s)
    assert peaks["triton"] <= 3.25 * copy, peaks["triton"] / copy


@pytest.mark.parametrize("normalize", [False, True])
def test_shared_candidates_match_separate_ones(normalize):
    """Anchors that are the candidates (one buffer per tensor for both roles) give the same
    statistics and gradients as the same values passed as separate candidate tensors."""
    from samtone_kernels._options import check_options

    options = check_options(
        directions=ALL_FOUR, partition="per_anchor", doc_anchor_weight=1.0, normalize=normalize, reduction="mean"
    )
    groups = torch.tensor([0, 1, 2, 0, 3, 4, 1, 5, 6, 7, 2, 8, 9, 0, 10, 11, 12, 13, 14], device=DEVICE)
    q, d, n = _inputs(19, 13, 2, seed=4)
    results = []
    for shared in (True, False):
        scale = torch.tensor(4.0, device=DEVICE, requires_grad=True)
        q_all, d_all = (q, d) if shared else (q * 1, d * 1)
        lse, pos = _triton.row_stats_triton(Rows(q, d, q_all, d_all, n, scale, groups, 0), options)
        stats = torch.cat([lse, pos[None]])
        weights = torch.linspace(-0.5, 1.5, stats.numel(), device=DEVICE).view_as(stats)
        results.append([stats.detach(), *torch.autograd.grad((stats * weights).sum(), [q, d, n, scale])])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_only_needed_tensors_are_saved():
    q, d, n = (x.detach() for x in _inputs())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = fused_samtone_loss(q, d, n, directions=ALL_FOUR, backend="triton")
    assert saved == [] and not loss.requires_grad


def test_n_equals_one_and_d_equals_one():
    for n_pairs, dim in [(1, 1), (1, 17), (17, 1)]:
        q, d, n = _inputs(n_pairs, dim, 1)
        ours = _loss_and_grads(q, d, n, directions=ALL_FOUR)
        tau = torch.tensor(0.1, device=DEVICE, requires_grad=True)
        loss = fused_samtone_loss(q, d, n, temperature=tau, directions=ALL_FOUR, backend="torch")
        theirs = [loss.detach(), *torch.autograd.grad(loss, [q, d, n, tau])]
        for a, b in zip(ours[:-1], theirs[:-1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        # dL/dtau sums terms of size |s| / tau that cancel exactly here (the document anchor's only
        # entry is its positive): compare at the size of the terms, not of their sum.
        logits = max(x.detach().norm(dim=-1).max() for x in (q, d, n)) ** 2 / 0.1
        torch.testing.assert_close(ours[-1], theirs[-1], rtol=1e-5, atol=1e-6 * float(logits) / 0.1)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
def test_nan_propagates_through_the_kernel():
    q, d, n = (x.detach() for x in _inputs())
    q[3, 2] = float("nan")
    for directions in [("q2d",), ALL_FOUR]:
        loss = fused_samtone_loss(q, d, n, directions=directions, backend="triton", reduction="none")
        assert torch.isnan(loss).all()


def test_auto_backend_uses_the_kernel_only_on_cuda(monkeypatch):
    calls = []
    real = _triton.row_stats_triton
    monkeypatch.setattr(_triton, "row_stats_triton", lambda *args: calls.append(1) or real(*args))
    q, d, n = (x.detach() for x in _inputs())
    fused_samtone_loss(q, d, n)
    assert calls == ([1] if DEVICE.type == "cuda" else [])
    fused_samtone_loss(q.double(), d.double(), n.double())  # auto: float64 goes to the torch path
    assert len(calls) == (1 if DEVICE.type == "cuda" else 0)
    with pytest.raises(TypeError, match="float64"):
        fused_samtone_loss(q.double(), d.double(), n.double(), backend="triton")


def test_custom_op_traces_under_torch_compile():
    """A training step under torch.compile (graph breaks allowed: the loss's host-side checks): the
    op is opaque to the compiler, with a fake and an autograd formula."""
    torch._dynamo.reset()
    q, d, n = _inputs()
    tower = torch.nn.Linear(q.shape[1], q.shape[1]).to(DEVICE)

    def step(q, d, n):
        loss = fused_samtone_loss(tower(q), d, n, directions=ALL_FOUR, normalize=True, backend="triton")
        loss.backward()
        return loss.detach()

    eager = step(q, d, n)
    grads_eager = [p.grad.clone() for p in tower.parameters()]
    tower.zero_grad()
    backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"
    compiled = torch.compile(step, backend=backend, fullgraph=False)(q, d, n)
    torch.testing.assert_close(compiled, eager)
    for g, e in zip([p.grad for p in tower.parameters()], grads_eager):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_custom_op_opcheck():
    """torch.library.opcheck: schema, fake implementation and autograd registration agree."""
    q, d, n = _inputs(11, 9, 1)
    scale = torch.tensor(5.0, device=DEVICE, requires_grad=True)
    groups = torch.tensor([0, 1, 0, 2, 3, 1, 4, 5, 6, 7, 0], device=DEVICE)
    for args in [
        (q, d, None, None, n, groups, scale, 0, "q2d,q2q,d2q,d2d", True),
        (q, d, q, d, n, groups, scale, 0, "q2d,q2q,d2q,d2d", False),
        (q[2:7], d[2:7], q, d, None, None, scale, 2, "q2d,q2q", True),
    ]:
        torch.library.opcheck(
            _triton.row_lse_op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration")
        )


@pytest.mark.parametrize("directions", [("q2d",), ALL_FOUR, ("q2d", "d2q")], ids="-".join)
def test_anchor_slice_with_offset_matches_torch(directions):
    """Anchors that are pairs offset .. offset + n - 1 of the candidates (one rank's slice of a
    gathered batch): kernel and torch implementation agree on the statistics (log-partitions and
    positive logits) and every gradient."""
    from samtone_kernels._options import check_options
    from samtone_kernels._torch_impl import row_stats_torch

    options = check_options(
        directions=directions, partition="per_anchor", doc_anchor_weight=1.0, normalize=False, reduction="mean"
    )
    groups = torch.tensor([0, 1, 2, 0, 3, 4, 1, 5, 6, 7, 2, 8, 9, 0, 10, 11, 12, 13, 14], device=DEVICE)
    results = []
    for row_stats in (_triton.row_stats_triton, row_stats_torch):
        q, d, n = _inputs(19, 13, 2, seed=3)
        scale = torch.tensor(4.0, device=DEVICE, requires_grad=True)
        lse, pos = row_stats(Rows(q[5:16], d[5:16], q, d, n, scale, groups, 5), options)
        stats = torch.cat([lse, pos[None]])
        weights = torch.linspace(-0.5, 1.5, stats.numel(), device=DEVICE).view_as(stats)
        grads = torch.autograd.grad((stats * weights).sum(), [q, d, n, scale])
        results.append([stats.detach().float(), *grads])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# GPU only
# --------------------------------------------------------------------------------------------------
def compare_with_torch_float32(n_pairs: int, dim: int, dtype: torch.dtype, normalize: bool = False) -> None:
    """The kernel against the eager implementation in float32, both fed the same embeddings (rounded
    to ``dtype``), so the comparison measures the kernel's arithmetic alone: unit vectors, or with
    ``normalize`` embeddings of norm about 3 * sqrt(D) that both normalise."""
    units = [
        (3 * x.detach() if normalize else torch.nn.functional.normalize(x.detach(), dim=-1)).to(dtype)
        for x in _inputs(n_pairs, dim, 1, dtype=torch.float32)
    ]
    kwargs = dict(directions=ALL_FOUR, group_ids=torch.arange(n_pairs, device=DEVICE) % 997, normalize=normalize)
    ours = _loss_and_grads(*(x.clone().requires_grad_() for x in units), **kwargs)
    q32, d32, n32 = (x.float().requires_grad_() for x in units)
    tau = torch.tensor(0.1, device=DEVICE, requires_grad=True)
    loss = fused_samtone_loss(q32, d32, n32, temperature=tau, backend="torch", **kwargs)
    theirs = [loss.detach(), *torch.autograd.grad(loss, [q32, d32, n32, tau])]
    # Budget: float32 logits of size 1 / tau, plus the kernel's probabilities rounded to ``dtype``.
    tol = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]
    for name, a, b in zip(["loss", "queries", "docs", "hard_negatives", "temperature"], ours, theirs):
        err = (a.float() - b).abs().max().item()
        assert err <= tol * max(b.abs().max().item(), 1e-6), (name, err)


def compare_row_statistics(n_pairs: int, dim: int, dtype: torch.dtype, stride: int) -> None:
    """log Zq of every ``stride``-th anchor against a float32 evaluation on the same rounded unit
    vectors, computed for those rows only (no N x N matrix even at large N)."""
    q, d, n = (x.detach() for x in _inputs(n_pairs, dim, 1, dtype=dtype))
    qb, db, nb = (torch.nn.functional.normalize(x.float(), dim=-1).to(dtype) for x in (q, d, n))
    qn, dn_, nn_ = qb.float(), db.float(), nb.float()
    cols = torch.cat([dn_, nn_[:, 0]])
    rows = torch.arange(0, n_pairs, stride, device=DEVICE)
    s = torch.cat([qn[rows] @ cols.T, qn[rows] @ qn.T], dim=1) * 20.0
    s[torch.arange(len(rows), device=DEVICE), 2 * n_pairs + rows] = float("-inf")  # q2q drops q_i
    expected = torch.logsumexp(s, dim=1)
    ours = _triton.row_lse_op(
        qb, db, None, None, nb, None, torch.tensor(20.0, device=DEVICE), 0, "q2d,q2q,d2q,d2d", False
    )
    torch.testing.assert_close(ours[0, rows], expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_large_batch_checks_at_small_size(dtype):
    """The GPU-only checks below, at a size the interpreter runs (so their code is exercised in CI)."""
    compare_with_torch_float32(45, 24, dtype)
    compare_with_torch_float32(45, 24, dtype, normalize=True)
    compare_row_statistics(45, 24, dtype, stride=7)


@pytest.mark.gpu
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("n_pairs,dim", [(4096, 768), (16384, 256)])
def test_gpu_large_batches_match_torch_float32(dtype, n_pairs, dim, normalize):
    compare_with_torch_float32(n_pairs, dim, dtype, normalize)


@pytest.mark.gpu
def test_gpu_samtone_peak_is_three_copies():
    """SamToNe, bfloat16, N = 16384, D = 768, normalize=True: by construction the peak is the two
    gradients and a float32 buffer of half the rows, 3 [N, D] bfloat16 copies (plus O(N))."""
    n_pairs, dim = 16384, 768
    q, d = _inputs(n_pairs, dim, 1, dtype=torch.bfloat16)[:2]
    fused_samtone_loss(q, d, normalize=True, backend="triton").backward()  # autotune outside the count
    peak = harness.peak_memory_bytes(
        lambda: torch.autograd.grad(fused_samtone_loss(q, d, normalize=True, backend="triton"), [q, d]), "cuda"
    )
    assert peak <= 3.1 * n_pairs * dim * 2, peak / (n_pairs * dim * 2)


@pytest.mark.gpu
def test_gpu_n_65536_forward_and_memory():
    """N = 65536 runs (the eager path would hold ~17 GB per N x N float32 block) with O(N D) memory."""
    n_pairs, dim = 65536, 128
    q, d, n = _inputs(n_pairs, dim, 1, dtype=torch.bfloat16)
    losses = []

    def step():
        losses.append(fused_samtone_loss(q, d, n, directions=ALL_FOUR, normalize=True, backend="triton"))
        return torch.autograd.grad(losses[-1], [q, d, n])

    step()  # autotuning (which allocates for its timing) outside the count
    peak = harness.peak_memory_bytes(step, "cuda")
    assert torch.isfinite(losses[-1])
    # By construction: the gradients of q and d (2 copies) and of n with its float32 buffer (1 + 2),
    # plus O(N); nothing N x N (one N x N float32 block would be 128 copies here).
    assert peak <= 5.5 * n_pairs * dim * 2, peak / (n_pairs * dim * 2)
    compare_row_statistics(n_pairs, dim, torch.bfloat16, stride=4099)


@pytest.mark.gpu
def test_gpu_deterministic_at_scale():
    q, d, n = _inputs(8192, 768, 1, dtype=torch.bfloat16)
    first = _loss_and_grads(q, d, n, directions=ALL_FOUR)
    again = _loss_and_grads(q, d, n, directions=ALL_FOUR)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
