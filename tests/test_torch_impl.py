"""The eager torch implementation against the reference; equivalences and invariances of the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import reference
from helpers import (DEVICE, DIRECTION_SETS, HARDNESS_MODES, JOINT_ONLY_SETS, Case, assert_grad_close,
                     assert_loss_close, cases, require)
from samtone_kernels import SamToNeLoss, fused_samtone_loss

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def run_and_compare(case: Case, dtype: torch.dtype, backend: str, tensor_temperature: bool) -> None:
    """Loss and every gradient of ``backend`` against the float64 reference on the same rounded inputs.

    The kernel path normalises in float32 and rounds the unit vectors back to ``dtype`` (the torch
    path keeps them in float32): that rounding is part of its budget.
    """
    case = case.rounded(dtype)
    tol = dict(renormalized=backend == "triton")
    q, d, n, kwargs = case.torch_inputs(dtype, tensor_temperature=tensor_temperature)
    loss = fused_samtone_loss(q, d, n, backend=backend, **kwargs)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_loss_close(loss, case.reference_loss(), dtype, case, **tol)
    loss.sum().backward()
    expected = case.reference_grad()
    assert_grad_close("queries", q.grad, expected["queries"], dtype, case, **tol)
    assert_grad_close("docs", d.grad, expected["docs"], dtype, case, **tol)
    if n is not None:
        assert_grad_close("hard_negatives", n.grad, expected["hard_negatives"], dtype, case, **tol)
    if tensor_temperature:
        assert_grad_close("temperature", kwargs["temperature"].grad, expected["temperature"], dtype, case, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(case=cases(), tensor_temperature=st.booleans())
def test_torch_matches_reference(dtype, case, tensor_temperature):
    run_and_compare(case, dtype, "torch", tensor_temperature)


def test_gradcheck_float64():
    rng = np.random.default_rng(0)
    q, d, n = (torch.tensor(rng.standard_normal(s), requires_grad=True) for s in [(3, 4), (3, 4), (3, 2, 4)])
    tau = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    def f(q, d, n, tau):
        return fused_samtone_loss(q, d, n, temperature=tau, directions=("q2d", "q2q", "d2q", "d2d"),
                                  group_ids=torch.tensor([0, 0, 1]), normalize=True, backend="torch")

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
    torch.testing.assert_close(fused_samtone_loss(q, d, n, backend="torch", **kwargs), base,
                               rtol=1e-9, atol=1e-9 / case.options["temperature"])


# --------------------------------------------------------------------------------------------------
# sentence-transformers' MultipleNegativesRankingLoss, for every configuration it can express
# --------------------------------------------------------------------------------------------------
ST_NAMES = {"q2d": "query_to_doc", "q2q": "query_to_query", "d2q": "doc_to_query", "d2d": "doc_to_doc"}


def _mnrl_configurations():
    """Every direction set MNRL accepts: with "joint" any set holding q2d; "per_direction" refuses
    q2q and d2d."""
    for dirs in DIRECTION_SETS + JOINT_ONLY_SETS:
        yield dirs, "joint", "joint"
        if not {"q2q", "d2d"} & set(dirs):
            yield dirs, "per_direction", "per_anchor"


@pytest.mark.parametrize("dirs,st_mode,partition", list(_mnrl_configurations()))
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
            model=None, scale=scale, similarity_fct=getattr(util, similarity), partition_mode=st_mode,
            directions=tuple(ST_NAMES[x] for x in dirs), hardness_mode=hardness_mode, hardness_strength=5.0,
        )
        theirs = mnrl.compute_loss_from_embeddings(columns, labels=None)
        ours = fused_samtone_loss(columns[0], columns[1], torch.stack(columns[2:], dim=1), temperature=1.0 / scale,
                                  directions=dirs, partition=partition, normalize=similarity == "cos_sim",
                                  hardness_mode=hardness_mode, hardness_strength=5.0, backend="torch")
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
        for a, b in zip(torch.autograd.grad(ours, columns), torch.autograd.grad(theirs, columns)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dirs,st_mode,partition", list(_mnrl_configurations()))
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
    ours = fused_samtone_loss(q, d, n, temperature=1.0 / scale, directions=dirs, partition=partition,
                              normalize=True, backend="torch")
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
    expected = fused_samtone_loss(q, d, temperature=0.1, directions=("q2d", "q2q", "d2q", "d2d"),
                                  normalize=True, group_ids=groups)
    torch.testing.assert_close(fixed(q, d, group_ids=groups), expected)
    assert list(fixed.parameters()) == []
    assert "directions=('q2d', 'q2q', 'd2q', 'd2d')" in repr(fixed)

    learnable = SamToNeLoss(0.1, learnable_temperature=True, normalize=True).to(DEVICE)
    torch.testing.assert_close(learnable.temperature.detach(), torch.tensor(0.1, device=DEVICE))
    learnable(q, d).backward()
    assert learnable.log_temperature.grad is not None and torch.isfinite(learnable.log_temperature.grad)
    assert "log_temperature" in learnable.state_dict()
