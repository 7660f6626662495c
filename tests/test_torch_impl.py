"""The eager torch implementation against the reference; equivalences and invariances of the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import reference
from helpers import (
    DEVICE,
    HARDNESS_MODES,
    ST_NAMES,
    cases,
    mnrl_configurations,
    require,
    run_and_compare,
)
from samtone_kernels import SamToNeLoss, _gemm, _torch_impl, fused_samtone_loss
from samtone_kernels._gemm import mm_f32

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(case=cases(), tensor_temperature=st.booleans())
def test_torch_matches_reference(dtype, case, tensor_temperature):
    run_and_compare(case, dtype, "torch", tensor_temperature)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@settings(max_examples=12)
@given(case=cases(max_n=5, max_d=6))
def test_torch_with_16_bit_gemms_matches_reference(dtype, case):
    """As on CUDA: 16-bit inputs go into the logit GEMMs as they are, float32 logits out, and so do the
    backward's (``_gemm.matmul_f32``); forced here, where the CPU upcasts inside the GEMM instead."""
    seen = []

    def spy(a, b):
        seen.append((a.dtype, b.dtype))
        return mm_f32(a, b)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_torch_impl, "gemms_in_input_dtype", lambda x: x.dtype in (torch.float16, torch.bfloat16))
        mp.setattr(_gemm, "mm_f32", spy)
        run_and_compare(case, dtype, "torch", tensor_temperature=False, renormalized=True, rounded_coefficients=True)
    assert seen and all(types == (dtype, dtype) for types in seen), seen


def test_gradcheck_float64():
    rng = np.random.default_rng(0)
    q, d, n = (torch.tensor(rng.standard_normal(s), requires_grad=True) for s in [(3, 4), (3, 4), (3, 2, 4)])
    tau = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    def f(q, d, n, tau):
        return fused_samtone_loss(
            q,
            d,
            n,
            temperature=tau,
            directions=("q2d", "q2q", "d2q", "d2d"),
            group_ids=torch.tensor([0, 0, 1]),
            normalize=True,
            backend="torch",
        )

    assert torch.autograd.gradcheck(f, (q, d, n, tau))


# --------------------------------------------------------------------------------------------------
# The reading guide's equivalences
# --------------------------------------------------------------------------------------------------
@given(cases(directions=("q2d",), max_n=6))
def test_infonce_is_cross_entropy(case):
    """("q2d",) is cross-entropy over the materialised [N, M] logits with target i."""
    q, d, n, kwargs = case.torch_inputs(torch.float64, requires_grad=False)
    kwargs["group_ids"] = None
    ours = fused_samtone_loss(q, d, n, backend="torch", **kwargs)
    if case.options["normalize"]:
        q, d = F.normalize(q, dim=-1), F.normalize(d, dim=-1)
        n = None if n is None else F.normalize(n, dim=-1)
    cols = d if n is None else torch.cat([d] + [n[:, k] for k in range(n.shape[1])])
    logits = q @ cols.T / case.options["temperature"]
    if case.options.get("hardness_mode"):  # the penalised logits, as sentence-transformers writes them
        mask = reference.hardness_mask(q.shape[0], cols.shape[0] // q.shape[0], case.options["hardness_mode"])
        logits = logits + case.options["hardness_strength"] * (q @ cols.T) * torch.from_numpy(mask)
    expected = F.cross_entropy(logits, torch.arange(q.shape[0]), reduction=case.options["reduction"])
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)


@given(st.data())
def test_group_mask_equals_deleting_group_mates(data):
    """Without hard negatives, masking i's group-mates gives i the loss it has in a batch without them."""
    n_pairs = data.draw(st.integers(2, 7))
    groups = data.draw(st.lists(st.integers(0, 2), min_size=n_pairs, max_size=n_pairs))
    case = data.draw(cases(max_n=n_pairs, max_h=0, group_ids=groups).filter(lambda c: c.n_pairs == n_pairs))
    options = {**case.options, "reduction": "none"}
    masked = reference.samtone_loss(case.q, case.d, group_ids=case.group_ids, **options)
    q, d, _, _ = case.torch_inputs(torch.float64, requires_grad=False)
    ours = fused_samtone_loss(q, d, group_ids=torch.tensor(groups), backend="torch", **options)
    np.testing.assert_allclose(ours.numpy(), masked, rtol=1e-10, atol=1e-10)
    g = np.asarray(groups)
    for i in range(n_pairs):
        keep = [i] + [j for j in range(n_pairs) if g[j] != g[i]]
        alone = fused_samtone_loss(q[keep], d[keep], backend="torch", **options)
        np.testing.assert_allclose(float(alone[0]), masked[i], rtol=1e-10, atol=1e-10 * case.logit_bound())


def test_samtone_without_same_tower_is_infonce_and_joint_equals_per_anchor_without_docs():
    rng = np.random.default_rng(3)
    q, d = torch.tensor(rng.standard_normal((5, 6))), torch.tensor(rng.standard_normal((5, 6)))
    # Without "d2q" there is no document anchor: both partitions are the same loss.
    for dirs in [("q2d",), ("q2d", "q2q")]:
        a = fused_samtone_loss(q, d, directions=dirs, partition="per_anchor", backend="torch")
        b = fused_samtone_loss(q, d, directions=dirs, partition="joint", backend="torch")
        torch.testing.assert_close(a, b)
    # Symmetric InfoNCE (CLIP): the mean of the two cross-entropies.
    logits = q @ d.T / 0.05
    target = torch.arange(5)
    clip = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    torch.testing.assert_close(fused_samtone_loss(q, d, directions=("q2d", "d2q"), backend="torch"), clip)


# --------------------------------------------------------------------------------------------------
# Invariances
# --------------------------------------------------------------------------------------------------
@given(case=cases(), data=st.data())
def test_permuting_the_batch_permutes_the_losses(case, data):
    perm = np.asarray(data.draw(st.permutations(range(case.n_pairs))))
    options = {**case.options, "reduction": "none"}
    base = reference.samtone_loss(case.q, case.d, case.n, group_ids=case.group_ids, **options)
    q, d, n, kwargs = case.torch_inputs(torch.float64, requires_grad=False)
    kwargs["reduction"] = "none"
    if case.group_ids is not None:
        kwargs["group_ids"] = kwargs["group_ids"][perm]
    permuted = fused_samtone_loss(q[perm], d[perm], None if n is None else n[perm], backend="torch", **kwargs)
    np.testing.assert_allclose(permuted.numpy(), base[perm], rtol=1e-9, atol=1e-9 * case.logit_bound())


@given(case=cases(), c=st.floats(0.1, 10.0))
def test_scaling_embeddings_by_c_and_temperature_by_c2(case, c):
    q, d, n, kwargs = case.torch_inputs(torch.float64, requires_grad=False)
    kwargs["normalize"] = False
    base = fused_samtone_loss(q, d, n, backend="torch", **kwargs)
    kwargs["temperature"] = kwargs["temperature"] * c * c
    if "hardness_strength" in kwargs:  # alpha * x . y: the raw similarity scales by c^2 too
        kwargs["hardness_strength"] = kwargs["hardness_strength"] / (c * c)
    scaled = fused_samtone_loss(q * c, d * c, None if n is None else n * c, backend="torch", **kwargs)
    torch.testing.assert_close(scaled, base, rtol=1e-9, atol=1e-9 * case.logit_bound())


@given(case=cases(), data=st.data())
def test_normalize_ignores_the_scale_of_any_embedding(case, data):
    q, d, n, kwargs = case.torch_inputs(torch.float64, requires_grad=False)
    kwargs["normalize"] = True
    base = fused_samtone_loss(q, d, n, backend="torch", **kwargs)
    which = data.draw(st.sampled_from(["q", "d"] + ([] if n is None else ["n"])))
    row = data.draw(st.integers(0, case.n_pairs - 1))
    factor = data.draw(st.floats(0.01, 100.0))
    q, d, n = q.clone(), d.clone(), None if n is None else n.clone()
    {"q": q, "d": d, "n": n}[which][row] *= factor
    torch.testing.assert_close(
        fused_samtone_loss(q, d, n, backend="torch", **kwargs), base, rtol=1e-9, atol=1e-9 / case.options["temperature"]
    )


# --------------------------------------------------------------------------------------------------
# sentence-transformers' MultipleNegativesRankingLoss, for every configuration it can express
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dirs,st_mode,partition", list(mnrl_configurations()))
@pytest.mark.parametrize("hardness_mode", HARDNESS_MODES)
@pytest.mark.parametrize("similarity", ["cos_sim", "dot_score"])
def test_hardness_weighting_equals_sentence_transformers_mnrl(dirs, st_mode, partition, hardness_mode, similarity):
    """Values and gradients in float64 against MNRL itself, with hard negatives (and a batch of 1)."""
    losses = require("sentence_transformers.sentence_transformer.losses")
    util = require("sentence_transformers.util")
    for n_pairs, n_hard in [(7, 2), (1, 1)]:
        rng = np.random.default_rng(len(dirs) * 10 + n_pairs + len(hardness_mode))
        columns = [torch.tensor(rng.standard_normal((n_pairs, 9)) / 3, requires_grad=True) for _ in range(2 + n_hard)]
        scale = 20.0 if similarity == "cos_sim" else 2.0
        mnrl = losses.MultipleNegativesRankingLoss(
            model=None,
            scale=scale,
            similarity_fct=getattr(util, similarity),
            partition_mode=st_mode,
            directions=tuple(ST_NAMES[x] for x in dirs),
            hardness_mode=hardness_mode,
            hardness_strength=5.0,
        )
        theirs = mnrl.compute_loss_from_embeddings(columns, labels=None)
        ours = fused_samtone_loss(
            columns[0],
            columns[1],
            torch.stack(columns[2:], dim=1),
            temperature=1.0 / scale,
            directions=dirs,
            partition=partition,
            normalize=similarity == "cos_sim",
            hardness_mode=hardness_mode,
            hardness_strength=5.0,
            backend="torch",
        )
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
        for a, b in zip(torch.autograd.grad(ours, columns), torch.autograd.grad(theirs, columns)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dirs,st_mode,partition", list(mnrl_configurations()))
@pytest.mark.parametrize("n_hard", [0, 2])
def test_equals_sentence_transformers_mnrl(dirs, st_mode, partition, n_hard):
    losses = require("sentence_transformers.sentence_transformer.losses")
    rng = np.random.default_rng(len(dirs) * 10 + n_hard)
    n_pairs, dim, scale = 6, 16, 20.0
    q = torch.tensor(rng.standard_normal((n_pairs, dim)), dtype=torch.float32)
    d = torch.tensor(rng.standard_normal((n_pairs, dim)), dtype=torch.float32)
    n = torch.tensor(rng.standard_normal((n_pairs, n_hard, dim)), dtype=torch.float32) if n_hard else None
    mnrl = losses.MultipleNegativesRankingLoss(
        model=None, scale=scale, directions=tuple(ST_NAMES[x] for x in dirs), partition_mode=st_mode
    )
    columns = [q, d] + ([] if n is None else [n[:, k] for k in range(n_hard)])
    theirs = mnrl.compute_loss_from_embeddings(columns, labels=None)
    ours = fused_samtone_loss(
        q, d, n, temperature=1.0 / scale, directions=dirs, partition=partition, normalize=True, backend="torch"
    )
    torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=2e-5)


# --------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------
def test_module_matches_function_and_learns_its_temperature():
    rng = np.random.default_rng(1)
    q = torch.tensor(rng.standard_normal((5, 8)), dtype=torch.float32, device=DEVICE)
    d = torch.tensor(rng.standard_normal((5, 8)), dtype=torch.float32, device=DEVICE)
    groups = torch.tensor([0, 1, 1, 2, 3], device=DEVICE)
    fixed = SamToNeLoss(0.1, directions=("q2d", "q2q", "d2q", "d2d"), normalize=True)
    expected = fused_samtone_loss(
        q, d, temperature=0.1, directions=("q2d", "q2q", "d2q", "d2d"), normalize=True, group_ids=groups
    )
    torch.testing.assert_close(fixed(q, d, group_ids=groups), expected)
    assert list(fixed.parameters()) == []
    assert "directions=('q2d', 'q2q', 'd2q', 'd2d')" in repr(fixed)

    learnable = SamToNeLoss(0.1, learnable_temperature=True, normalize=True).to(DEVICE)
    torch.testing.assert_close(learnable.temperature.detach(), torch.tensor(0.1, device=DEVICE))
    learnable(q, d).backward()
    assert learnable.log_temperature.grad is not None and torch.isfinite(learnable.log_temperature.grad)
    assert "log_temperature" in learnable.state_dict()


# --------------------------------------------------------------------------------------------------
# Row chunks: the torch backend's memory bound
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@given(case=cases(max_n=9), tensor_temperature=st.booleans())
def test_row_chunks_match_the_reference(dtype, case, tensor_temperature):
    """A budget of one byte: one anchor row per checkpointed chunk, values and every gradient (the
    temperature's too) against the reference; groups, hard negatives, hardness and both partitions
    come from the drawn cases."""
    from samtone_kernels import _torch_impl

    with _torch_impl.chunk_budget(1):
        run_and_compare(case, dtype, "torch", tensor_temperature)


def test_row_chunks_give_the_unchunked_values_and_gradients():
    """Chunks of 1, 3 and all 11 anchor rows of a gathered-style slice (offset 5 among 19 candidates,
    groups, hard negatives, hardness, a tensor scale): the same statistics and gradients."""
    from samtone_kernels._contract import Rows
    from samtone_kernels._options import check_options
    from samtone_kernels._torch_impl import _LIVE_BUFFERS, chunk_rows, row_bytes, row_lse_torch

    options = check_options(
        directions=("q2d", "q2q", "d2q", "d2d"),
        partition="per_anchor",
        doc_anchor_weight=1.0,
        normalize=False,
        reduction="mean",
        hardness_mode="all_negatives",
        hardness_strength=2.0,
    )
    g = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 6, (19,), generator=g)
    results = []
    for rows_per_chunk in (1, 3, 11):
        q, d = (
            torch.randn(19, 8, generator=torch.Generator().manual_seed(s), dtype=torch.float64).requires_grad_()
            for s in (1, 2)
        )
        n = torch.randn(19, 2, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64).requires_grad_()
        scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
        rows = Rows(q[5:16], d[5:16], q, d, n, scale, groups, 5)
        per_row = _LIVE_BUFFERS * (57 + 19) * 8  # an anchor row: 57 document columns + 19 queries, float64
        assert row_bytes(19, 57, options, 8) == per_row
        assert chunk_rows(19, 57, options, 8, budget=rows_per_chunk * per_row) == rows_per_chunk
        lse = row_lse_torch(rows.q, rows.d, q, d, n, scale, groups, 5, options, budget=rows_per_chunk * per_row)
        weights = torch.linspace(-0.5, 1.5, lse.numel(), dtype=torch.float64).view_as(lse)
        results.append([lse.detach(), *torch.autograd.grad((lse * weights).sum(), [q, d, n, scale])])
    for other in results[:2]:
        for a, b in zip(other, results[2]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_row_chunks_bound_the_peak_memory(monkeypatch):
    """Forward + backward of SamToNe at N = 512, D = 16 (logits: 512 x 1024 per anchor row block,
    32 [N, D] copies each): with a budget of 32 rows per chunk the peak allocation falls to a small
    fraction of the unchunked one and stays within the budget plus O(N D), measured with torch's
    allocation events (bench/harness.py)."""
    from bench import harness
    from samtone_kernels import _torch_impl

    n_pairs, dim = 512, 16
    g = torch.Generator().manual_seed(0)
    q, d = (torch.randn(n_pairs, dim, generator=g, requires_grad=True) for _ in range(2))

    def step():
        loss = fused_samtone_loss(q, d, directions=("q2d", "q2q"), normalize=True, backend="torch")
        return torch.autograd.grad(loss, [q, d])

    copy = n_pairs * dim * 4
    budget = 32 * _torch_impl._LIVE_BUFFERS * (2 * n_pairs) * 4  # 32 rows of q2d + q2q logits
    peaks = {}
    for name, chunk_bytes in (("unchunked", 1 << 40), ("chunked", budget)):
        monkeypatch.setattr(_torch_impl, "CHUNK_BYTES", chunk_bytes)
        step()
        peaks[name] = harness.peak_memory_bytes(step, "cpu")
    print(
        f"torch backend peak, N = {n_pairs}, D = {dim}: unchunked {peaks['unchunked'] / copy:.1f} copies, "
        f"chunked (32 rows) {peaks['chunked'] / copy:.1f}"
    )
    assert peaks["unchunked"] >= 2 * n_pairs * 2 * n_pairs * 4  # the check can fail: N x 2N float32 logits
    assert peaks["chunked"] <= peaks["unchunked"] / 5, peaks
    assert peaks["chunked"] <= budget + 12 * copy, (peaks["chunked"], budget)


# Matmul units (of 2 N^2 D FLOPs) of forward + backward in one process, one chunk: 3 per logit block
# computed, and d2q's block is q2d's transposed (0 more); q2q and d2d are computed whole.
TORCH_MATMUL_UNITS = {
    ("q2d",): 3,
    ("q2d", "d2q"): 3,
    ("q2d", "q2q"): 6,
    ("q2d", "d2q", "d2d"): 6,
    ("q2d", "q2q", "d2q", "d2d"): 9,
}


@pytest.mark.parametrize("directions", list(TORCH_MATMUL_UNITS), ids="-".join)
@pytest.mark.parametrize("n_hard", [0, 2])
def test_one_matmul_serves_q2d_and_d2q(directions, n_hard):
    """torch's FLOP counter over forward + backward: through the public function d2q costs no matmul
    of its own; with the candidates passed as copies of the anchors (as a gathered batch is) D Q^T is
    computed apart, 3 more units."""
    from torch.utils.flop_counter import FlopCounterMode

    from samtone_kernels._contract import Rows
    from samtone_kernels._options import check_options
    from samtone_kernels._torch_impl import row_lse_torch

    n_pairs, dim = 12, 8
    g = torch.Generator().manual_seed(0)
    q, d = (torch.randn(n_pairs, dim, generator=g, requires_grad=True) for _ in range(2))
    n = torch.randn(n_pairs, n_hard, dim, generator=g, requires_grad=True) if n_hard else None
    options = check_options(
        directions=directions, partition="per_anchor", doc_anchor_weight=1.0, normalize=False, reduction="mean"
    )
    inputs = [q, d] + ([n] if n_hard else [])
    rows = Rows(q, d, q * 1, d * 1, n, 2.0)

    def public():  # the loss as users call it: one process, one chunk
        return fused_samtone_loss(*inputs, directions=directions, backend="torch")

    def apart():
        return row_lse_torch(rows.q, rows.d, rows.q_all, rows.d_all, rows.n_all, rows.scale, None, 0, options).sum()

    unit = 2 * n_pairs * n_pairs * dim
    for run, extra in ((public, 0), (apart, 3 * ("d2q" in directions))):
        with FlopCounterMode(display=False) as counter:
            torch.autograd.grad(run(), inputs)
        blocks_with_negatives = ("q2d" in directions) + ("d2d" in directions)  # columns: M = N (1 + H)
        expected = TORCH_MATMUL_UNITS[directions] + extra + 3 * n_hard * blocks_with_negatives
        assert counter.get_total_flops() == expected * unit, (run.__name__, counter.get_total_flops() / unit, expected)


def test_chunk_bytes_sets_the_torch_backends_chunks(monkeypatch):
    """The public ``chunk_bytes`` budget reaches the torch backend: SamToNe at N = 12 (a query row:
    12 document columns + 12 queries, 4 float32 buffers) in chunks of 5 rows, the same loss."""
    from samtone_kernels import _torch_impl

    calls = []
    block = _torch_impl.row_lse_block
    monkeypatch.setattr(_torch_impl, "row_lse_block", lambda q, *a, **k: calls.append(q.shape[0]) or block(q, *a, **k))
    g = torch.Generator().manual_seed(0)
    q, d = (torch.randn(12, 4, generator=g) for _ in range(2))
    whole = fused_samtone_loss(q, d, backend="torch")
    chunked = fused_samtone_loss(q, d, backend="torch", chunk_bytes=5 * _torch_impl._LIVE_BUFFERS * 24 * 4)
    assert calls == [12, 5, 5, 2]
    torch.testing.assert_close(chunked, whole)
