"""``backend="auto"`` by measurement (``samtone_kernels._choice``), on CPU under the interpreter with an
injected clock: which path wins, caching per key, the disagreement fallback, the memory rule, the
pin, and that the measurement leaves training alone."""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers import DEVICE
from samtone_kernels import backend_choices, fused_samtone_loss

pytest.importorskip("triton")
from samtone_kernels import _backends, _choice  # noqa: E402

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="the injected clock on CPU (GPU: gpu_check.sh)")


@pytest.fixture
def clock(monkeypatch):
    """Measure on CPU with a clock that reads a table of times per path and counts its calls."""
    times = {"triton": 2.0, "hybrid": 1.0}
    calls = []

    def timer(name, run):
        calls.append(name)
        run()
        return times[name]

    monkeypatch.setattr(_choice, "MEASURE_ON_CPU", True)
    monkeypatch.setattr(_choice, "TIMER", timer)
    monkeypatch.delenv("SAMTONE_BACKEND", raising=False)
    _choice.clear_choices()
    yield times, calls
    _choice.clear_choices()


def _inputs(n=12, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=g).requires_grad_() for _ in range(2)]


def test_the_faster_path_is_chosen_and_cached_per_key(clock):
    times, calls = clock
    q, d = _inputs()
    fused_samtone_loss(q, d, directions=("q2d", "q2q"))
    assert calls == ["triton", "hybrid"]
    ((key, chosen),) = backend_choices().items()
    assert chosen == "hybrid" and key[3] == 16  # N = 12 in the bucket of 16
    fused_samtone_loss(*_inputs(n=15, seed=1), directions=("q2d", "q2q"))  # same key: no measurement
    assert calls == ["triton", "hybrid"]
    times["triton"] = 0.5
    fused_samtone_loss(*_inputs(n=17), directions=("q2d", "q2q"))  # another N bucket: measured again
    fused_samtone_loss(q, d, directions=("q2d", "d2q"))  # another direction set too
    assert calls == ["triton", "hybrid"] * 3
    assert sorted(backend_choices().values()) == ["hybrid", "triton", "triton"]


def test_the_measurement_leaves_training_alone(clock):
    q, d = _inputs()
    before = (q.detach().clone(), d.detach().clone(), torch.get_rng_state())
    tau = torch.tensor(0.1, requires_grad=True)
    loss = fused_samtone_loss(q, d, temperature=tau, directions=("q2d", "q2q", "d2q", "d2d"))
    assert q.grad is None and d.grad is None and tau.grad is None  # no gradient leaked from the measurement
    assert torch.equal(q.detach(), before[0]) and torch.equal(d.detach(), before[1])
    assert torch.equal(torch.get_rng_state(), before[2])
    loss.backward()  # the returned loss is the chosen path's, with its graph
    expected = fused_samtone_loss(
        *(x.detach().requires_grad_() for x in (q, d)),
        temperature=0.1,
        directions=("q2d", "q2q", "d2q", "d2d"),
        backend="hybrid",
    )
    torch.testing.assert_close(loss, expected)


def test_paths_that_disagree_warn_once_and_fall_back_to_hybrid(clock, monkeypatch):
    _, calls = clock
    triton = _backends.REGISTRY["triton"]

    def wrong(rows, options):
        lse, pos = triton.row_stats(rows, options)
        return lse + 1.0, pos

    monkeypatch.setitem(_backends.REGISTRY, "triton", triton._replace(row_stats=wrong))
    q, d = _inputs()
    with pytest.warns(RuntimeWarning, match="disagree"):
        fused_samtone_loss(q, d)
    assert list(backend_choices().values()) == ["hybrid"] and calls == []  # not timed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per key
        fused_samtone_loss(q, d)


def test_a_path_over_the_free_memory_is_not_eligible(clock, monkeypatch):
    _, calls = clock
    n, dim = 12, 8
    fused = _choice.peak_bytes("triton", n, n, dim, 4, None)
    assert _choice.peak_bytes("hybrid", n, n, dim, 4, None) > fused
    monkeypatch.setattr(_choice, "free_bytes", lambda device: fused)
    fused_samtone_loss(*_inputs(n, dim))
    assert list(backend_choices().values()) == ["triton"] and calls == []  # one eligible path: nothing measured


def test_the_environment_pins_the_path(clock, monkeypatch):
    _, calls = clock
    monkeypatch.setenv("SAMTONE_BACKEND", "triton")
    fused_samtone_loss(*_inputs())
    assert calls == [] and backend_choices() == {}
    monkeypatch.setenv("SAMTONE_BACKEND", "fused")
    with pytest.raises(ValueError, match="SAMTONE_BACKEND"):
        fused_samtone_loss(*_inputs())


def test_cpu_keeps_torch_without_measuring(monkeypatch):
    monkeypatch.setattr(_choice, "MEASURE_ON_CPU", False)
    _choice.clear_choices()
    assert _choice.measured_paths(torch.randn(3, 2)) == []
    fused_samtone_loss(*_inputs())
    assert backend_choices() == {}


def test_an_evaluation_call_takes_the_first_path_and_measures_nothing(clock):
    """Under torch.no_grad (an evaluation pass) the measurement, which runs a backward, cannot run:
    the first candidate computes the loss and nothing is cached, so the next training call measures."""
    _, calls = clock
    q, d = _inputs()
    with torch.no_grad():
        loss = fused_samtone_loss(q, d)
    torch.testing.assert_close(loss, fused_samtone_loss(q.detach(), d.detach(), backend="triton"))
    assert calls == [] and backend_choices() == {}
    fused_samtone_loss(q, d)
    assert calls == ["triton", "hybrid"]


def test_a_matryoshka_call_measures_the_one_pass_paths(clock):
    """The hybrid and eager backends compute every Matryoshka prefix in one pass, the fused kernel
    each prefix apart: a Matryoshka call times the first two (and keys apart from the plain loss)."""
    times, calls = clock
    times["torch"] = 0.5
    q, d = _inputs(dim=8)
    loss = fused_samtone_loss(q, d, normalize=True, matryoshka_dims=(4, 8))
    assert calls == ["hybrid", "torch"]
    assert list(backend_choices().values()) == ["torch"]
    expected = fused_samtone_loss(q, d, normalize=True, matryoshka_dims=(4, 8), backend="torch")
    torch.testing.assert_close(loss, expected)
    fused_samtone_loss(q, d, normalize=True)  # the plain loss: its own key, the GPU paths only
    assert calls == ["hybrid", "torch", "triton", "hybrid"]
