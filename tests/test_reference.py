"""The reference's hand-derived gradients against autograd and finite differences, in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given

import reference
from helpers import Case, assert_reference_grads_match_finite_differences, cases


def autograd_of_reference_formula(case: Case):
    """The loss written in torch float64 from the reference's own blocks and masks, then autograd."""
    opts = case.options
    q = torch.tensor(case.q, requires_grad=True)
    d = torch.tensor(case.d, requires_grad=True)
    n = None if case.n is None else torch.tensor(case.n, requires_grad=True)
    tau = torch.tensor(float(opts["temperature"]), dtype=torch.float64, requires_grad=True)
    blocks = reference.build_blocks(
        case.q,
        case.d,
        case.n,
        temperature=1.0,
        group_ids=case.group_ids,
        normalize=opts["normalize"],
        false_negative_margin=opts.get("false_negative_margin"),
        hard_negative_scope=opts.get("hard_negative_scope", "shared"),
    )

    def prep(x):
        return torch.nn.functional.normalize(x, dim=-1, eps=1e-12) if opts["normalize"] else x

    qh, dh = prep(q), prep(d)
    cols = dh if n is None else torch.cat([dh] + [prep(n)[:, k] for k in range(n.shape[1])])
    neg_inf = torch.tensor(-torch.inf, dtype=torch.float64)

    def block(a, b, keep):
        return torch.where(torch.from_numpy(keep), a @ b.T / tau, neg_inf)

    qd, qq = block(qh, cols, blocks.keep_qd), block(qh, qh, blocks.keep_qq)
    dq, dd = block(dh, qh, blocks.keep_dq), block(dh, cols, blocks.keep_dd)
    if opts.get("hardness_mode"):  # + alpha * stop_grad(raw similarity) on the mode's q2d entries
        mask = reference.hardness_mask(len(case.q), cols.shape[0] // len(case.q), opts["hardness_mode"])
        qd = qd + opts["hardness_strength"] * (qh @ cols.T).detach() * torch.from_numpy(mask)
    dirs = set(opts["directions"])
    q_side = [qd] + ([qq] if "q2q" in dirs else [])
    d_side = ([dq] if "d2q" in dirs else []) + ([dd] if "d2d" in dirs else [])
    pos = (qh * dh).sum(-1) / tau
    if opts["partition"] == "joint" or not d_side:
        losses = torch.logsumexp(torch.cat(q_side + d_side, 1), 1) - pos
    else:
        w = opts["doc_anchor_weight"]
        lq = torch.logsumexp(torch.cat(q_side, 1), 1) - pos
        ld = torch.logsumexp(torch.cat(d_side, 1), 1) - pos
        losses = (lq + w * ld) / (1 + w)
    total = losses.mean() if opts["reduction"] == "mean" else losses.sum()
    total.backward()
    out = {"queries": q.grad, "docs": d.grad, "temperature": tau.grad}
    if n is not None:
        out["hard_negatives"] = n.grad
    return losses.detach(), out


@given(cases())
def test_reference_gradients_match_autograd(case):
    losses, expected = autograd_of_reference_formula(case)
    got = case.reference_grad()
    ref_losses = reference.samtone_loss(
        case.q, case.d, case.n, group_ids=case.group_ids, **{**case.options, "reduction": "none"}
    )
    np.testing.assert_allclose(ref_losses, losses.numpy(), rtol=1e-10, atol=1e-10 * case.logit_bound())
    assert set(got) == set(expected)
    for name, value in expected.items():
        scale = max(float(np.abs(value.numpy()).max(initial=0.0)), case.grad_floor())
        np.testing.assert_allclose(got[name], value.numpy(), rtol=1e-9, atol=1e-9 * scale, err_msg=name)


@given(cases(margin=True))
def test_reference_gradients_match_autograd_with_a_margin(case):
    """The false-negative margin is a mask: the hand-derived gradient still matches autograd."""
    test_reference_gradients_match_autograd.hypothesis.inner_test(case)


@given(cases(own=True, margin=True))
def test_reference_gradients_match_autograd_with_own_hard_negatives(case):
    """``hard_negative_scope="own"`` is a mask too (with a margin beside it)."""
    test_reference_gradients_match_autograd.hypothesis.inner_test(case)


def test_own_hard_negatives_are_the_own_querys_only():
    """ "own": a query's loss moves with its own hard negatives only, a document's with none."""
    rng = np.random.default_rng(0)
    q, d, n = rng.standard_normal((3, 4)), rng.standard_normal((3, 4)), rng.standard_normal((3, 2, 4))
    options = dict(directions=("q2d", "q2q", "d2q", "d2d"), reduction="none", hard_negative_scope="own")
    moved = n.copy()
    moved[1] += 5.0  # pair 1's hard negatives
    before = reference.samtone_loss(q, d, n, **options)
    after = reference.samtone_loss(q, d, moved, **options)
    assert np.allclose(before[[0, 2]], after[[0, 2]]) and not np.isclose(before[1], after[1])
    shared = reference.samtone_loss(q, d, moved, **{**options, "hard_negative_scope": "shared"})
    assert not np.allclose(
        shared[[0, 2]], reference.samtone_loss(q, d, n, **{**options, "hard_negative_scope": "shared"})[[0, 2]]
    )
    with pytest.raises(ValueError, match="hard_negative_scope"):
        reference.samtone_loss(q, d, n, hard_negative_scope="mine")


@pytest.mark.parametrize("seed", range(4))
def test_reference_gradients_match_finite_differences(seed):
    rng = np.random.default_rng(seed)
    n_pairs, dim, n_hard = 4, 3, 1
    q, d = rng.standard_normal((n_pairs, dim)), rng.standard_normal((n_pairs, dim))
    n = rng.standard_normal((n_pairs, n_hard, dim))
    options = dict(
        temperature=0.7,
        directions=("q2d", "q2q", "d2q", "d2d"),
        group_ids=np.array([0, 1, 0, 2]),
        partition=["per_anchor", "joint"][seed % 2],
        doc_anchor_weight=[0.3, 1.0][seed % 2],
        normalize=seed >= 2,
    )
    assert_reference_grads_match_finite_differences(q, d, n, options)
    grads = reference.samtone_grad(q, d, n, **options)
    h = 1e-6
    tau = options.pop("temperature")
    numeric_tau = (
        reference.samtone_loss(q, d, n, temperature=tau + h, **options)
        - reference.samtone_loss(q, d, n, temperature=tau - h, **options)
    ) / (2 * h)
    np.testing.assert_allclose(grads["temperature"], numeric_tau, rtol=1e-5)
