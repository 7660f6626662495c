"""Shared pieces of the tests: random cases, Hypothesis strategies, per-dtype tolerances."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
import torch
from hypothesis import strategies as st

import reference
from samtone_kernels import _plan, fused_samtone_loss
from samtone_kernels.integrations.sentence_transformers import DIRECTION_NAMES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

DIRECTION_SETS = list(_plan.DIRECTION_SETS)
# Document anchors without d2q: only one joint softmax holds their positive (partition="joint").
JOINT_ONLY_SETS = list(_plan.JOINT_ONLY_SETS)
HARDNESS_MODES = ["in_batch_negatives", "hard_negatives", "all_negatives"]

# Unit roundoff of each dtype; every tolerance below is built from these, in this one place.
EPS = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}


def require(module: str):
    """Import an optional peer: skip without it, but fail where the run promised it (``make test``)."""
    if os.environ.get("SAMTONE_REQUIRE_OPTIONAL") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module)


@dataclass
class Case:
    """One random configuration of the contract, held in float64 NumPy."""

    q: np.ndarray
    d: np.ndarray
    n: np.ndarray | None
    group_ids: np.ndarray | None
    options: dict = field(default_factory=dict)

    @property
    def n_pairs(self) -> int:
        return self.q.shape[0]

    def rounded(self, dtype: torch.dtype) -> Case:
        """The same case with embeddings rounded to ``dtype``, so a reference sees the same inputs."""

        def r(x):
            return None if x is None else torch.from_numpy(x).to(dtype).double().numpy()

        return replace(self, q=r(self.q), d=r(self.d), n=r(self.n))

    def reference_loss(self):
        return reference.samtone_loss(self.q, self.d, self.n, group_ids=self.group_ids, **self.options)

    def reference_grad(self):
        return reference.samtone_grad(self.q, self.d, self.n, group_ids=self.group_ids, **self.options)

    def torch_inputs(
        self, dtype: torch.dtype, device=DEVICE, requires_grad: bool = True, tensor_temperature: bool = False
    ):
        """(queries, docs, hard_negatives, kwargs) for ``fused_samtone_loss``."""

        def t(x):
            if x is None:
                return None
            return torch.from_numpy(x).to(device=device, dtype=dtype).requires_grad_(requires_grad)

        kwargs = dict(self.options)
        if tensor_temperature:  # held in the compute dtype; the reference sees the same value
            kwargs["temperature"] = torch.tensor(
                float(self.options["temperature"]),
                device=device,
                requires_grad=True,
                dtype=torch.float64 if dtype == torch.float64 else torch.float32,
            )
        if self.group_ids is not None:
            kwargs["group_ids"] = torch.from_numpy(self.group_ids).to(device)
        return t(self.q), t(self.d), t(self.n), kwargs

    # ---- error scales (see tolerance()) -------------------------------------------------------------
    def _norms(self):
        xs = [self.q, self.d] + ([] if self.n is None else [self.n.reshape(-1, self.q.shape[1])])
        return np.concatenate([np.linalg.norm(x, axis=-1) for x in xs])

    def logit_bound(self) -> float:
        """max |s| over all logits: (max norm)^2 / tau, or 1 / tau after normalisation; with the
        hardness penalty, plus alpha times the raw similarity (tau times that)."""
        tau = float(self.options["temperature"])
        bound = 1.0 / tau if self.options.get("normalize") else float(self._norms().max()) ** 2 / tau
        if self.options.get("hardness_mode"):
            bound *= 1.0 + self.options.get("hardness_strength", 0.0) * tau
        return bound

    def upstream(self) -> tuple[float, float]:
        """(max c_i, sum c_i) of the reduction's weights."""
        n = self.n_pairs
        return (1.0 / n, 1.0) if self.options.get("reduction", "mean") == "mean" else (1.0, float(n))

    def grad_floor(self) -> float:
        """Natural size of an embedding-gradient entry: c |y| / tau (over |x| when normalising)."""
        c_max, _ = self.upstream()
        tau = float(self.options["temperature"])
        if self.options.get("normalize"):
            return c_max / tau / max(float(self._norms().min()), 1e-12)
        return c_max * float(self._norms().max()) / tau


def _logit_error(dtype: torch.dtype, case: Case, renormalized: bool) -> float:
    """Relative error of a logit: float32 (float64) arithmetic on |s|, plus, where the unit vectors
    are rounded back to ``dtype`` after normalising (``renormalized``), two roundings of them."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    err = 16 * EPS[compute]
    if renormalized and case.options.get("normalize"):
        err += 4 * EPS[dtype]
    return err * (1.0 + case.logit_bound())


#: Where the backward's GEMMs take the coefficients G = dL/dS rounded to a 16-bit dtype (the eager
#: backend's 16-bit GEMMs), a gradient entry sum_j G_ij y_j carries one rounding per coefficient: u
#: times the coefficient mass sum_j |G_ij| that row collects, in units of the natural size c / tau.
#: That is up to 2 from its own softmax and positive, plus, as a candidate of other anchors (q2q, d2d,
#: d2q), their probabilities' column sums; 3 in all is budgeted. Found by Hypothesis (bf16, SamToNe,
#: N = 4): 2.1 u with the rounding, 0.5 u with the coefficients kept in float32. The fused and hybrid
#: paths round G to the input dtype too, and keep the tighter budget until an example says otherwise.
COEFFICIENT_MASS = 3


def tolerance(dtype: torch.dtype, case: Case, renormalized: bool = False, rounded_coefficients: bool = False) -> float:
    """Relative error budget of a gradient: the logits' error, plus one rounding of the result (and
    of the kernel's probabilities) to ``dtype``; with ``rounded_coefficients``, the coefficients'
    rounding for the backward GEMMs instead of the probabilities' (``COEFFICIENT_MASS``)."""
    coefficients = COEFFICIENT_MASS if rounded_coefficients else 1
    return _logit_error(dtype, case, renormalized) + (1 + coefficients) * EPS[dtype]


def assert_loss_close(
    actual: torch.Tensor, expected, dtype: torch.dtype, case: Case, renormalized: bool = False
) -> None:
    _, c_sum = case.upstream()
    atol = _logit_error(dtype, case, renormalized) * (c_sum if case.options.get("reduction") == "sum" else 1.0)
    actual = actual.detach().double().cpu().numpy()
    err = np.abs(actual - np.asarray(expected)).max()
    assert err <= atol, f"loss: max error {err:.3g} > {atol:.3g} (dtype {dtype})"


def assert_grad_close(
    name: str,
    actual: torch.Tensor | None,
    expected,
    dtype: torch.dtype,
    case: Case,
    renormalized: bool = False,
    rounded_coefficients: bool = False,
) -> None:
    assert actual is not None, f"{name}: no gradient"
    assert actual.dtype == (dtype if name != "temperature" else actual.dtype), f"{name}: dtype {actual.dtype}"
    actual = actual.detach().double().cpu().numpy()
    expected = np.asarray(expected)
    if name == "temperature":
        tau = float(case.options["temperature"])
        _, c_sum = case.upstream()
        floor = (1.0 if case.options.get("reduction") == "mean" else c_sum) * case.logit_bound() / tau
    else:
        floor = case.grad_floor()
    atol = tolerance(dtype, case, renormalized, rounded_coefficients) * max(
        float(np.abs(expected).max(initial=0.0)), floor
    )
    err = float(np.abs(actual - expected).max(initial=0.0))
    assert err <= atol, f"{name}: max error {err:.3g} > {atol:.3g} (dtype {dtype}, floor {floor:.3g})"


@st.composite
def cases(
    draw,
    max_n: int = 7,
    max_d: int = 9,
    max_h: int = 3,
    directions=None,
    group_ids=None,
    margin: bool = False,
    own: bool = False,
) -> Case:
    """A random configuration: sizes (N = 1, odd N and D included), directions, partition, weight,
    group ids with ties, normalisation, reduction, temperature in [0.01, 10], large norms, duplicate
    rows (tied logits); with ``margin``, a false-negative margin (``margin_in_a_gap``); with ``own``,
    ``hard_negative_scope="own"`` and at least one hard negative."""
    n_pairs = draw(st.integers(1, max_n))
    dim = draw(st.integers(1, max_d))
    n_hard = draw(st.integers(1 if own else 0, max_h))
    dirs = draw(st.sampled_from(DIRECTION_SETS + JOINT_ONLY_SETS)) if directions is None else directions
    partition = "joint" if dirs in JOINT_ONLY_SETS else draw(st.sampled_from(["per_anchor", "joint"]))
    hardness_mode = draw(st.sampled_from([None, None, None] + HARDNESS_MODES))
    hardness_strength = draw(st.sampled_from([0.5, 5.0])) if hardness_mode else 0.0
    weight = 1.0 if partition == "joint" or "d2q" not in dirs else draw(st.sampled_from([1.0, 0.1, 0.0, 3.0]))
    if group_ids is None:
        groups = draw(st.one_of(st.none(), st.lists(st.integers(0, 2), min_size=n_pairs, max_size=n_pairs)))
    else:
        groups = group_ids
    normalize = draw(st.booleans())
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    temperature = float(10.0 ** draw(st.floats(-2.0, 1.0)))
    norm_scale = draw(st.sampled_from([0.3, 1.0, 4.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    duplicate = draw(st.booleans())

    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n_pairs, dim)) * norm_scale / np.sqrt(dim)
    d = rng.standard_normal((n_pairs, dim)) * norm_scale / np.sqrt(dim)
    n = rng.standard_normal((n_pairs, n_hard, dim)) * norm_scale / np.sqrt(dim) if n_hard else None
    if duplicate and n_pairs > 1:  # tied logits: a repeated query and a repeated document
        q[-1], d[-1] = q[0], d[0]
    # Keep norms away from 0 so normalisation is well conditioned at every dtype.
    for x in (q, d) + (() if n is None else (n,)):
        norms = np.linalg.norm(x, axis=-1, keepdims=True)
        x *= np.where(norms < 0.1 * norm_scale, 0.1 * norm_scale / np.maximum(norms, 1e-30), 1.0)
    options = dict(
        temperature=temperature,
        directions=dirs,
        partition=partition,
        doc_anchor_weight=weight,
        normalize=normalize,
        reduction=reduction,
    )
    if hardness_mode:
        options.update(hardness_mode=hardness_mode, hardness_strength=hardness_strength)
    if own:
        options["hard_negative_scope"] = "own"
    case = Case(q, d, n, None if groups is None else np.asarray(groups, dtype=np.int64), options)
    if margin:
        case.options["false_negative_margin"] = margin_in_a_gap(case, draw(st.floats(0.0, 1.0)))
    return case


def margin_in_a_gap(case: Case, where: float) -> float:
    """A false-negative margin m whose thresholds ``q_i . d_i + m`` sit in a wide gap between the
    entries' raw similarities (every block, in float64), so that no dtype's rounding moves an entry
    across one: the comparison the backends make is then exact. ``where`` in [0, 1] picks the gap
    (0: below every entry, which drops all but the positives; 1: above every entry, which drops none)."""
    b = reference.build_blocks(case.q, case.d, case.n, temperature=1.0, normalize=case.options["normalize"])
    pos = np.einsum("ij,ij->i", b.q, b.d)[:, None]
    gaps = np.sort(np.concatenate([(s - pos).ravel() for s in (b.s_qd, b.s_qq, b.s_dq, b.s_dd)]))
    width = 0.02 * max(1.0, float(np.abs(gaps).max()))  # a few times the float16 error of a raw similarity
    edges = [(lo, hi) for lo, hi in zip(gaps[:-1], gaps[1:]) if hi - lo > 2 * width]
    candidates = [gaps[0] - 1.0] + [(lo + hi) / 2 for lo, hi in edges] + [gaps[-1] + 1.0]
    return float(candidates[min(int(where * len(candidates)), len(candidates) - 1)])


def assert_reference_grads_match_finite_differences(q, d, n, options: dict, h: float = 1e-6) -> None:
    """``reference.samtone_grad`` against central differences of ``reference.samtone_loss`` for the
    queries, documents and hard negatives (float64 arrays, perturbed in place and restored)."""
    grads = reference.samtone_grad(q, d, n, **options)
    for name, x in (("queries", q), ("docs", d), ("hard_negatives", n)):
        numeric = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            old = x[idx]
            x[idx] = old + h
            up = reference.samtone_loss(q, d, n, **options)
            x[idx] = old - h
            down = reference.samtone_loss(q, d, n, **options)
            x[idx] = old
            numeric[idx] = (up - down) / (2 * h)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-5, atol=1e-7, err_msg=name)


def run_and_compare(
    case: Case,
    dtype: torch.dtype,
    backend: str,
    tensor_temperature: bool,
    renormalized: bool | None = None,
    rounded_coefficients: bool = False,
    **extra,
) -> None:
    """Loss and every gradient of ``backend`` against the float64 reference on the same rounded inputs.

    The kernel paths normalise in float32 and round the unit vectors back to ``dtype`` (the torch
    path keeps them in float32, ``renormalized`` unless told): that rounding is part of their budget.
    ``rounded_coefficients``: the backward's GEMMs take the coefficients in ``dtype`` (``tolerance``).
    ``extra``: options of the implementation that do not change the loss (``chunk_bytes``), passed to
    it only.
    """
    case = case.rounded(dtype)
    tol = dict(renormalized=backend in ("triton", "hybrid") if renormalized is None else renormalized)
    grad_tol = dict(tol, rounded_coefficients=rounded_coefficients)
    q, d, n, kwargs = case.torch_inputs(dtype, tensor_temperature=tensor_temperature)
    loss = fused_samtone_loss(q, d, n, backend=backend, **kwargs, **extra)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_loss_close(loss, case.reference_loss(), dtype, case, **tol)
    loss.sum().backward()
    expected = case.reference_grad()
    assert_grad_close("queries", q.grad, expected["queries"], dtype, case, **grad_tol)
    assert_grad_close("docs", d.grad, expected["docs"], dtype, case, **grad_tol)
    if n is not None:
        assert_grad_close("hard_negatives", n.grad, expected["hard_negatives"], dtype, case, **grad_tol)
    if tensor_temperature:
        assert_grad_close("temperature", kwargs["temperature"].grad, expected["temperature"], dtype, case, **grad_tol)


# sentence-transformers' MultipleNegativesRankingLoss: its direction names, and every configuration it can express
ST_NAMES = {ours: theirs for theirs, ours in DIRECTION_NAMES.items()}


def mnrl_configurations():
    """Every direction set MNRL accepts: with "joint" any set holding q2d; "per_direction" refuses
    q2q and d2d."""
    for dirs in DIRECTION_SETS + JOINT_ONLY_SETS:
        yield dirs, "joint", "joint"
        if not {"q2q", "d2d"} & set(dirs):
            yield dirs, "per_direction", "per_anchor"
