"""The benchmark harness: timing, peak memory, the same-run matmul rate, the agreement check, the
result table and files (CSV, JSON, PNG) and the header naming the machine and versions.

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
def time_quantiles_ms(fn: Callable[[], object], device: str, repeats: int) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) milliseconds: triton's do_bench on the GPU, a monotonic clock
    on the CPU (``repeats`` runs after a warm-up)."""
    if device == "cuda":
        from triton.testing import do_bench

        median, low, high = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return float(median), float(low), float(high)
    fn()  # warm-up (compilation, caches)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(1e3 * (time.perf_counter() - start))
    samples.sort()

    def quantile(f: float) -> float:
        return samples[min(len(samples) - 1, round(f * (len(samples) - 1)))]

    return statistics.median(samples), quantile(0.2), quantile(0.8)


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


def matmul_tflops(n_pairs: int, dim: int, device: str, repeats: int) -> tuple[float, str]:
    """Rate of a plain matmul of comparable size in this run: bfloat16 on the GPU, float32 on the CPU."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n = min(n_pairs, 16384)
    a = torch.randn(n, dim, device=device, dtype=dtype)
    b = torch.randn(dim, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, repeats)
    return 2 * n * n * dim / (ms * 1e-3) / 1e12, str(dtype).replace("torch.", "")


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


def format_row(r: dict) -> str:
    def num(key, fmt):
        width = fmt[1:].split(".")[0]
        return format(r[key], fmt) if isinstance(r.get(key), (int, float)) else format("-", f">{width}")

    return (
        f"{r['workload']:<22}{r['n']:>8}{r['d']:>6} {r['dtype']:<9}{r['impl']:<22}"
        f"{num('fwd_bwd_ms', '>11.3f')}{num('fwd_ms', '>10.3f')}{num('peak_mem_mb', '>11.1f')}"
        f"{num('tflops', '>9.2f')}{num('efficiency', '>7.2f')}  {r['status']}"
        + (f" ({r['note']})" if r.get("note") else "")
    )


TABLE_HEAD = (
    f"{'workload':<22}{'N':>8}{'D':>6} {'dtype':<9}{'impl':<22}{'fwd+bwd ms':>11}{'fwd ms':>10}"
    f"{'peak MB':>11}{'TFLOP/s':>9}{'eff':>7}  status"
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
