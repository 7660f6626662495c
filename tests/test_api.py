"""Argument checking (every bad input raises before any compute, naming the argument) and NaN/inf."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import DEVICE
from samtone_kernels import SamToNeLoss, fused_samtone_loss

N, D, H = 4, 5, 2


def inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dtype)  # noqa: E731
    return make(N, D), make(N, D), make(N, H, D)


BAD = [
    # (description, overrides, exception, words the message must contain)
    ("queries rank", dict(queries=torch.randn(N)), ValueError, "queries"),
    ("docs shape", dict(docs=torch.randn(N + 1, D)), ValueError, "docs"),
    ("docs dim", dict(docs=torch.randn(N, D + 1)), ValueError, "docs"),
    ("negatives rank", dict(hard_negatives=torch.randn(N, D)), ValueError, "hard_negatives"),
    ("negatives N", dict(hard_negatives=torch.randn(N + 1, H, D)), ValueError, "hard_negatives"),
    ("negatives D", dict(hard_negatives=torch.randn(N, H, D + 1)), ValueError, "hard_negatives"),
    ("empty batch", dict(queries=torch.randn(0, D), docs=torch.randn(0, D), hard_negatives=None), ValueError, "empty"),
    ("zero dim", dict(queries=torch.randn(N, 0), docs=torch.randn(N, 0), hard_negatives=None), ValueError, "D = 0"),
    ("integer queries", dict(queries=torch.ones(N, D, dtype=torch.int64)), TypeError, "queries"),
    ("bool docs", dict(docs=torch.ones(N, D, dtype=torch.bool)), TypeError, "docs"),
    ("not a tensor", dict(queries=[[1.0] * D] * N), TypeError, "queries"),
    ("mixed dtypes", dict(docs=torch.randn(N, D, dtype=torch.float64)), TypeError, "dtype"),
    ("temperature 0", dict(temperature=0.0), ValueError, "temperature"),
    ("temperature < 0", dict(temperature=-0.1), ValueError, "temperature"),
    ("temperature nan", dict(temperature=math.nan), ValueError, "temperature"),
    ("temperature inf", dict(temperature=math.inf), ValueError, "temperature"),
    ("temperature str", dict(temperature="0.05"), TypeError, "temperature"),
    ("temperature bool", dict(temperature=True), TypeError, "temperature"),
    ("temperature shape", dict(temperature=torch.tensor([0.1, 0.2])), ValueError, "temperature"),
    ("temperature 1-D", dict(temperature=torch.tensor([0.1])), ValueError, "0-dim"),
    ("temperature int tensor", dict(temperature=torch.tensor(1)), TypeError, "temperature"),
    ("temperature tensor <= 0", dict(temperature=torch.tensor(-1.0)), ValueError, "temperature"),
    ("unknown direction", dict(directions=("q2d", "d2x")), ValueError, "d2x"),
    ("string directions", dict(directions="q2d"), TypeError, "directions"),
    ("string directions hint", dict(directions="q2q"), TypeError, r"write \('q2d', 'q2q'\)"),
    ("string q2d hint", dict(directions="q2d"), TypeError, r"write \('q2d',\) for InfoNCE"),
    ("duplicate direction", dict(directions=("q2d", "q2q", "q2d")), ValueError, "at most once"),
    ("missing q2d", dict(directions=("q2q",)), ValueError, "q2d"),
    ("d2d without d2q", dict(directions=("q2d", "d2d")), ValueError, "d2d"),
    ("unknown hardness mode", dict(hardness_mode="hard"), ValueError, "hardness_mode"),
    (
        "negative hardness",
        dict(hardness_mode="hard_negatives", hardness_strength=-1.0),
        ValueError,
        "hardness_strength",
    ),
    ("hardness type", dict(hardness_mode="all_negatives", hardness_strength="5"), TypeError, "hardness_strength"),
    ("hardness nan", dict(hardness_mode="all_negatives", hardness_strength=math.nan), ValueError, "hardness_strength"),
    ("unknown partition", dict(partition="global"), ValueError, "partition"),
    ("unknown reduction", dict(reduction="max"), ValueError, "reduction"),
    ("negative weight", dict(doc_anchor_weight=-0.5), ValueError, "doc_anchor_weight"),
    ("weight with joint", dict(partition="joint", doc_anchor_weight=0.1), ValueError, "doc_anchor_weight"),
    ("weight type", dict(doc_anchor_weight="1"), TypeError, "doc_anchor_weight"),
    ("group float", dict(group_ids=torch.zeros(N)), TypeError, "group_ids"),
    ("group bool", dict(group_ids=torch.zeros(N, dtype=torch.bool)), TypeError, "group_ids"),
    ("group shape", dict(group_ids=torch.zeros(N + 1, dtype=torch.int64)), ValueError, "group_ids"),
    ("group list", dict(group_ids=[0] * N), TypeError, "group_ids"),
    ("normalize type", dict(normalize="yes"), TypeError, "normalize"),
    ("unknown backend", dict(backend="cuda"), ValueError, "backend"),
    ("chunk_bytes 0", dict(chunk_bytes=0), ValueError, "chunk_bytes"),
    ("chunk_bytes float", dict(chunk_bytes=1.5e9), ValueError, "chunk_bytes"),
    ("chunk_bytes bool", dict(chunk_bytes=True), ValueError, "chunk_bytes"),
    ("margin nan", dict(false_negative_margin=math.nan), ValueError, "false_negative_margin"),
    ("margin inf", dict(false_negative_margin=math.inf), ValueError, "false_negative_margin"),
    ("margin str", dict(false_negative_margin="0.1"), TypeError, "false_negative_margin"),
]


@pytest.mark.parametrize("desc,overrides,exc,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_naming_the_argument(desc, overrides, exc, words, monkeypatch):
    from samtone_kernels._backends import REGISTRY

    def must_not_run(*args, **kwargs):
        raise AssertionError("computed before validating")

    for name, backend in list(REGISTRY.items()):
        monkeypatch.setitem(REGISTRY, name, backend._replace(prepare=must_not_run, row_stats=must_not_run))
    q, d, n = inputs()
    args = dict(queries=q, docs=d, hard_negatives=n)
    args.update(overrides)
    args = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) and k != "temperature" else v) for k, v in args.items()}
    with pytest.raises(exc, match=words):
        fused_samtone_loss(args.pop("queries"), args.pop("docs"), args.pop("hard_negatives"), **args)


def test_a_doc_anchor_weight_without_d2q_warns():
    q, d, n = inputs()
    with pytest.warns(UserWarning, match="doc_anchor_weight"):
        fused_samtone_loss(q, d, n, directions=("q2d", "q2q"), doc_anchor_weight=0.1, backend="torch")


def test_mixed_devices_raise():
    q, d, n = inputs()  # "meta" is a second device on every machine
    with pytest.raises(ValueError, match="docs"):
        fused_samtone_loss(q, d.to("meta"), n)
    with pytest.raises(ValueError, match="hard_negatives"):
        fused_samtone_loss(q, d, n.to("meta"))


def test_module_checks_options_at_construction():
    with pytest.raises(ValueError, match="d2d"):
        SamToNeLoss(directions=("q2d", "d2d"))
    with pytest.raises(ValueError, match="temperature"):
        SamToNeLoss(temperature=0.0)
    with pytest.raises(TypeError, match="learnable_temperature"):
        SamToNeLoss(temperature=torch.tensor(0.1))


def test_triton_backend_on_cpu_without_interpreter_says_so(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, d, n = (x.cpu() for x in inputs())
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        fused_samtone_loss(q, d, n, backend="triton")


def test_a_triton_backend_this_machine_cannot_run_is_refused_at_construction(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for backend in ("triton", "hybrid"):
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            SamToNeLoss(backend=backend)
    SamToNeLoss(backend="torch")


def test_options_that_do_nothing_warn():
    q, d, n = inputs()
    with pytest.warns(UserWarning, match="hardness_strength=2.0 has no effect"):
        fused_samtone_loss(q, d, hardness_strength=2.0)
    with pytest.warns(UserWarning, match="has no effect with hardness_strength=0.0"):
        fused_samtone_loss(q, d, hardness_mode="all_negatives")
    with pytest.warns(UserWarning, match="without hard negatives"):
        fused_samtone_loss(q, d, hardness_mode="hard_negatives", hardness_strength=1.0)
    with pytest.warns(UserWarning, match="process_group has no effect"):
        fused_samtone_loss(q, d, process_group=object())


def test_a_lone_positive_gives_an_exact_zero_never_a_negative_loss():
    """N = 1 without negatives: the softmax holds the positive alone, so l = 0; rounding between the
    positive logit and the log-partition can leave -1e-7, which the trainer would log as a negative
    loss. Never below 0; the gradient is kept (it is 0 here)."""
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        q, d = (torch.randn(1, 7, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
        loss = fused_samtone_loss(q * 3, d, directions=("q2d",))
        assert float(loss.detach()) >= 0.0
        grads = torch.autograd.grad(loss, [q, d])
        assert all(float(x.abs().max()) < 1e-5 for x in grads)


def test_hard_negatives_with_zero_columns_are_none():
    q, d, _ = inputs()
    a = fused_samtone_loss(q, d, torch.empty(N, 0, D, device=DEVICE), backend="torch")
    torch.testing.assert_close(a, fused_samtone_loss(q, d, backend="torch"))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["queries", "docs", "hard_negatives"])
@pytest.mark.parametrize("directions", [("q2d",), ("q2d", "q2q", "d2q", "d2d")])
@pytest.mark.parametrize("normalize", [False, True])
def test_non_finite_embeddings_give_nan(bad, where, directions, normalize):
    q, d, n = inputs()
    {"queries": q, "docs": d, "hard_negatives": n}[where].view(-1)[3] = bad
    for reduction in ("mean", "sum", "none"):
        loss = fused_samtone_loss(
            q, d, n, directions=directions, normalize=normalize, reduction=reduction, backend="torch"
        )
        assert torch.isnan(loss).all(), (reduction, loss)


def test_group_ids_on_another_device_are_moved():
    q, d, n = inputs()
    groups = torch.tensor([0, 0, 1, 2])
    a = fused_samtone_loss(q, d, n, group_ids=groups, backend="torch")
    b = fused_samtone_loss(q, d, n, group_ids=groups.to(DEVICE).int(), backend="torch")
    torch.testing.assert_close(a, b)
