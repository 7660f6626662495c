"""The benchmark harness: timing (several implementations' runs interleaved), peak memory, the
same-run matmul that rates are compared with, the agreement check, the result table and files (CSV,
JSON, PNG) and the header naming the machine and versions.

Generic: it knows nothing of the loss's workloads or implementations (those are ``bench.peers``);
``bench.speed`` puts the two together. The scripts run as modules from the repository root
(``python -m bench.speed``).
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def peer_version(module: str) -> str | None:
    """The installed version of a peer (None when it cannot be imported)."""
    try:
        __import__(module)
    except ImportError:
        return None
    try:
        return importlib.metadata.version(module.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "installed"


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------
def _quantiles(samples: Sequence[float]) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) of samples (the percentiles by nearest rank)."""
    samples = sorted(samples)

    def quantile(f: float) -> float:
        return samples[min(len(samples) - 1, round(f * (len(samples) - 1)))]

    return statistics.median(samples), quantile(0.2), quantile(0.8)


class _ClockTimer:
    """Wall-clock time around each call (the CPU)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock

    def start(self) -> float:
        return self.clock()

    def stop(self, started: float) -> Callable[[], float]:
        ms = 1e3 * (self.clock() - started)
        return lambda: ms

    def finish(self) -> None:
        pass


def _l2_flush_buffer() -> torch.Tensor:
    """256 MB on the GPU, zeroed before each timed call so that no call finds the previous one's data
    in L2 (as ``triton.testing.do_bench``)."""
    return torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda")


class _CudaTimer:
    """CUDA events around each call, after flushing L2 (``triton.testing.do_bench``'s method); the
    readings are valid after ``finish``."""

    def __init__(self) -> None:
        self.flush = _l2_flush_buffer()

    def start(self) -> tuple:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.flush.zero_()
        begin.record()
        return begin, end

    def stop(self, events: tuple) -> Callable[[], float]:
        begin, end = events
        end.record()
        return lambda: begin.elapsed_time(end)

    def finish(self) -> None:
        torch.cuda.synchronize()


#: On the GPU, warm-up and timed milliseconds per implementation (``triton.testing.do_bench``'s
#: defaults): the number of rounds follows from a first estimate of each call's time, and is at
#: least CUDA_MIN_ROUNDS (calls of a second or more, at the largest sizes, get no more).
CUDA_WARMUP_MS, CUDA_REP_MS, CUDA_MIN_ROUNDS = 25.0, 100.0, 3


def time_interleaved_ms(
    fns: Sequence[Callable[[], object]], device: str, repeats: int, clock: Callable[[], float] = time.perf_counter
) -> list[tuple[float, float, float] | BaseException]:
    """Time the implementations of one workload together, their repetitions interleaved: a warm-up
    call of each, then repetition 1 of each in turn, repetition 2 of each, and so on (round-robin),
    so that the load of a busy machine, or a GPU's clock, hits them alike.

    CPU: ``repeats`` rounds timed by ``clock``. GPU (``repeats`` unused): CUDA events around each
    call after an L2 flush, as ``triton.testing.do_bench``, with as many rounds as fill about
    ``CUDA_REP_MS`` per implementation (after about ``CUDA_WARMUP_MS`` of warm-up), and at least
    ``CUDA_MIN_ROUNDS``.

    Returns, per fn, (median, 20th, 80th percentile) milliseconds, or the out-of-memory error it
    raised (it then sits out the later rounds); any other error propagates.
    """
    results: list = [None] * len(fns)
    active = list(range(len(fns)))

    def call(i: int) -> bool:
        """fns[i] once; False, and fns[i] out of the rounds, when it runs out of memory."""
        try:
            fns[i]()
        except Exception as exc:  # noqa: BLE001 - an implementation running out of memory is a result
            if not is_oom(exc):
                raise
            results[i] = exc
            active.remove(i)
            if device == "cuda":
                torch.cuda.empty_cache()
            return False
        return True

    for i in list(active):  # warm-up (compilation, autotuning, caches)
        call(i)
    timer = _CudaTimer() if device == "cuda" else _ClockTimer(clock)
    rounds = repeats
    if device == "cuda" and active:
        estimates = []
        for i in list(active):  # each call's time, from 5 calls (as do_bench)
            handle = timer.start()
            if all(call(i) for _ in range(5)):
                read = timer.stop(handle)
                timer.finish()
                estimates.append(read() / 5)
        total = max(sum(estimates), 1e-3)
        for _ in range(max(1, int(CUDA_WARMUP_MS * len(active) / total))):
            for i in list(active):
                call(i)
        rounds = max(CUDA_MIN_ROUNDS, int(CUDA_REP_MS * len(active) / total))
    readings: dict[int, list[Callable[[], float]]] = {i: [] for i in active}
    for _ in range(rounds):
        for i in list(active):
            handle = timer.start()
            if call(i):
                readings[i].append(timer.stop(handle))
    timer.finish()
    for i in active:
        results[i] = _quantiles([read() for read in readings[i]])
    return results


def time_quantiles_ms(fn: Callable[[], object], device: str, repeats: int) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) milliseconds of one function: triton's do_bench on the GPU, a
    monotonic clock on the CPU (``repeats`` runs after a warm-up). Out of memory propagates."""
    if device == "cuda":
        from triton.testing import do_bench

        median, low, high = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return float(median), float(low), float(high)
    (result,) = time_interleaved_ms([fn], device, repeats)
    if isinstance(result, BaseException):
        raise result
    return result


def time_ms(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median milliseconds (``time_quantiles_ms``)."""
    return time_quantiles_ms(fn, device, repeats)[0]


#: A row whose 20th-80th percentile range is wider than this fraction of its median is flagged: on a
#: busy machine its median cannot be read against the other rows'.
NOISY_SPREAD = 0.25


def spread_note(median: float, low: float, high: float) -> str:
    """ "" or a flag for a timing whose spread is too wide to read."""
    if median > 0 and (high - low) / median > NOISY_SPREAD:
        return f"noisy: p20-p80 {low:.3g}-{high:.3g} ms"
    return ""


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's native start/stop lines on stderr (fn ran once already, unprofiled)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak bytes allocated by ``fn`` above what was allocated before it, its outputs included.

    GPU: the caching allocator's peak counter. CPU: the CPU allocator keeps no such counter, so the
    profiler records every allocation and free made through torch's allocator, and the peak of
    their running sum is taken. Both count tensors (and torch's own temporaries), not the memory
    that the allocator caches or that NumPy allocates (the Triton interpreter's scratch).
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def matmul_yardstick(n_pairs: int, dim: int, device: str) -> tuple[Callable[[], object], int, str]:
    """A plain matmul of comparable size, to time in the same run as the loss (its rate is the yardstick
    of the ``efficiency`` column): the function, its FLOPs and its dtype's name (bfloat16 on the GPU,
    float32 on the CPU). [n, dim] @ [dim, n] with n = min(n_pairs, 16384)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n = min(n_pairs, 16384)
    a = torch.randn(n, dim, device=device, dtype=dtype)
    b = torch.randn(dim, n, device=device, dtype=dtype)
    return (lambda: a @ b), 2 * n * n * dim, str(dtype).replace("torch.", "")


def agrees(value: float, ours: float, dtype: torch.dtype) -> bool:
    """A row's loss against ours: relative 2e-2 for 16-bit inputs, 1e-4 for float32 (and NaN fails)."""
    rtol = 1e-4 if dtype == torch.float32 else 2e-2
    return abs(value - ours) <= rtol * max(1.0, abs(ours))


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# --------------------------------------------------------------------------------------------------
# The table, the header and the files
# --------------------------------------------------------------------------------------------------
COLUMNS = [
    "workload",
    "n",
    "d",
    "h",
    "dtype",
    "impl",
    "status",
    "fwd_bwd_ms",
    "fwd_bwd_p20_ms",
    "fwd_bwd_p80_ms",
    "fwd_ms",
    "peak_mem_mb",
    "tflops",
    "matmul_tflops",
    "efficiency",
    "loss",
    "ours_loss",
]


def header(device: str, peers: dict, cpu_note: str | None = None) -> list[str]:
    """Comment lines naming the date, the machine (``cpu_note`` in parentheses after a CPU's name), the
    versions of python, torch, triton and the peers, and the commit."""
    lines = [f"# date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        lines.append(f"# GPU {props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}")
    else:
        note = f" ({cpu_note})" if cpu_note else ""
        lines.append(f"# CPU {platform.processor() or platform.machine()} x{os.cpu_count()}{note}")
    triton = peer_version("triton") or "not installed"
    lines.append(f"# python {platform.python_version()}, torch {torch.__version__}, triton {triton}")
    lines.append("# peers: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in peers.items()))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
            check=True,
        ).stdout.strip()
        lines.append(f"# commit {commit}")
    except (OSError, subprocess.CalledProcessError):
        pass
    return lines


def format_row(r: dict, device: str = "cuda") -> str:
    """A row of the printed table (``table_head``): on a GPU with TFLOP/s, on a CPU without (a few
    hundredths there, which informs nobody: time, peak memory and eff, the ratio to the same-run
    matmul's rate, do)."""

    def num(key, fmt):
        width = fmt[1:].split(".")[0]
        return format(r[key], fmt) if isinstance(r.get(key), (int, float)) else format("-", f">{width}")

    rate = num("tflops", ">9.2f") if device == "cuda" else ""
    return (
        f"{r['workload']:<22}{r['n']:>8}{r['d']:>6} {r['dtype']:<9}{r['impl']:<22}"
        f"{num('fwd_bwd_ms', '>11.3f')}{num('fwd_ms', '>10.3f')}{num('peak_mem_mb', '>11.1f')}"
        f"{rate}{num('efficiency', '>7.2f')}  {r['status']}" + (f" ({r['note']})" if r.get("note") else "")
    )


def table_head(device: str) -> str:
    """The printed table's column names (``format_row``)."""
    rate = f"{'TFLOP/s':>9}" if device == "cuda" else ""
    return (
        f"{'workload':<22}{'N':>8}{'D':>6} {'dtype':<9}{'impl':<22}{'fwd+bwd ms':>11}{'fwd ms':>10}"
        f"{'peak MB':>11}{rate}{'eff':>7}  status"
    )


def write_results(
    rows: list[dict], lines: list[str], out_dir: str, stem: str, plot: bool, impls: Sequence[str] = ()
) -> list[str]:
    """``stem``.csv, .json (with the header ``lines``) and, with ``plot``, .png in ``out_dir``; the
    paths written. ``impls``: every implementation's name in the order that picks its plot colour."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    path = os.path.join(out_dir, f"{stem}.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    written.append(path)
    path = os.path.join(out_dir, f"{stem}.json")
    with open(path, "w") as f:
        json.dump({"header": lines, "rows": rows}, f, indent=1)
    written.append(path)
    if plot:
        path = os.path.join(out_dir, f"{stem}.png")
        if plot_results(rows, path, title=" | ".join(x.lstrip("# ") for x in lines[1:3]), impls=impls):
            written.append(path)
    return written


def plot_results(rows: list[dict], path: str, title: str = "", impls: Sequence[str] = ()) -> bool:
    """Time and peak memory against N (log-log), one line per implementation and dtype; one colour per
    implementation, by its place in ``impls`` (else in ``rows``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib is not installed: no plot (pip install -e '.[bench]')")
        return False
    order = list(dict.fromkeys([*impls, *(r["impl"] for r in rows)]))
    done = [r for r in rows if r.get("status") == "ok"]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    has_mem = any(r.get("peak_mem_mb") is not None for r in done)
    ncols = 2 if has_mem else 1
    fig, axes = plt.subplots(len(workloads), ncols, figsize=(6 * ncols, 3.2 * len(workloads)), squeeze=False)
    for i, wname in enumerate(workloads):
        series = {}
        for r in done:
            if r["workload"] == wname:
                series.setdefault((r["impl"], r["dtype"]), []).append(r)
        for (impl, dtype), pts in sorted(series.items()):
            pts.sort(key=lambda r: r["n"])
            style = dict(
                linestyle="-" if dtype != "float32" else "--",
                marker="o",
                label=f"{impl} ({dtype})",
                color=f"C{order.index(impl)}",
            )  # one colour per implementation
            axes[i][0].plot([r["n"] for r in pts], [r["fwd_bwd_ms"] for r in pts], **style)
            if has_mem:
                axes[i][1].plot([r["n"] for r in pts], [r["peak_mem_mb"] for r in pts], **style)
        axes[i][0].set(title=f"{wname}: forward + backward", xlabel="N", ylabel="ms", xscale="log", yscale="log")
        if has_mem:
            axes[i][1].set(
                title=f"{wname}: peak memory above inputs", xlabel="N", ylabel="MiB", xscale="log", yscale="log"
            )
        axes[i][0].legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, 110), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
