"""Speed and memory of the fused loss, side by side with what a user would use instead.

    python bench/speed.py                 # the full sweep for this machine (GPU: N = 4096 .. 262144)
    python bench/speed.py --quick         # one small size of each workload
    python bench/speed.py --workloads samtone --sizes 8192 16384 --dtypes bfloat16

Implementations, timed on the same inputs in the same run:
  ours-fused            the Triton kernel (CUDA only)
  ours-eager            the eager torch backend as shipped (row chunks only past 1 GiB of logits)
  eager-chunked         the baseline a careful PyTorch user writes instead of a kernel: the eager loss
                        in row chunks of --chunk-rows anchors (default N / 8), each under
                        torch.utils.checkpoint (O(c * M) memory, 4 matmul units for 3 textbook)
  torch.compile         torch.compile of the eager implementation
  sentence-transformers MultipleNegativesRankingLoss.compute_loss_from_embeddings (cosine, scale 1/tau),
                        for every workload it can express
  inf-cl                inf_cl.cal_inf_loss, symmetric InfoNCE only (CUDA only)

Every row checks that the implementation's loss agrees with ours before its time is reported. Results
are printed as rows complete and written to bench/results/ as CSV, JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench import HelpFormatter  # noqa: E402
from samtone_kernels import _torch_impl, fused_samtone_loss, triton_available  # noqa: E402
from samtone_kernels._options import check_options  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TEMPERATURE = 0.05
ST_NAMES = {"q2d": "query_to_doc", "q2q": "query_to_query", "d2q": "doc_to_query", "d2d": "doc_to_doc"}


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    directions: tuple[str, ...]
    partition: str
    n_hard: int
    dim: int

    def options(self) -> dict:
        return dict(temperature=TEMPERATURE, directions=self.directions, partition=self.partition,
                    normalize=True)


WORKLOADS = {
    w.name: w
    for w in [
        Workload("samtone", ("q2d", "q2q"), "per_anchor", 0, 768),
        Workload("bidirectional-samtone", ("q2d", "q2q", "d2q", "d2d"), "per_anchor", 1, 1024),
        Workload("symmetric-infonce", ("q2d", "d2q"), "per_anchor", 0, 768),
        Workload("gte", ("q2d", "q2q", "d2q", "d2d"), "joint", 0, 768),
    ]
}
GPU_SIZES = [4096 * 2**k for k in range(7)]  # 4096 .. 262144
CPU_SIZES = [256, 512, 1024]
QUICK_SIZE = {"cuda": 4096, "cpu": 128}


# --------------------------------------------------------------------------------------------------
# Work counted
# --------------------------------------------------------------------------------------------------
def pair_count(w: Workload, n_pairs: int) -> int:
    """Anchor-candidate pairs P over the selected directions (no group masking)."""
    m = n_pairs * (1 + w.n_hard)
    count = n_pairs * m  # q2d
    if "q2q" in w.directions:
        count += n_pairs * (n_pairs - 1)
    if "d2q" in w.directions:
        count += n_pairs * n_pairs
    if "d2d" in w.directions:
        count += n_pairs * (m - (1 + w.n_hard))  # minus pair i's own columns
    return count


def flop_count(w: Workload, n_pairs: int) -> int:
    """3 * 2 * D * P: one logit matmul forward, two in the backward (recomputation not counted)."""
    return 3 * 2 * w.dim * pair_count(w, n_pairs)


# --------------------------------------------------------------------------------------------------
# Implementations: each returns a loss function of (q, d, n) or None where it cannot express w
# --------------------------------------------------------------------------------------------------
def _peer_version(module: str) -> str | None:
    """The installed version of a peer (None when it cannot be imported)."""
    try:
        __import__(module)
    except ImportError:
        return None
    try:
        return importlib.metadata.version(module.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "installed"


# A factory returns the implementation of a workload on a device, or the reason it has no row there.
def impl_fused(w: Workload, device: str):
    if device != "cuda" or not triton_available():
        return "the fused Triton kernel needs a CUDA GPU and triton"
    return functools.partial(fused_samtone_loss, backend="triton", **w.options())


def impl_eager(w: Workload, device: str):
    return functools.partial(fused_samtone_loss, backend="torch", **w.options())


CHUNK_ROWS: int | None = None  # eager-chunked's rows per chunk (--chunk-rows); None: N / 8


def impl_chunked(w: Workload, device: str):
    options = check_options(directions=w.directions, partition=w.partition, doc_anchor_weight=1.0,
                            normalize=True, reduction="mean")

    def run(q, d, n):
        n_pairs = q.shape[0]
        rows = CHUNK_ROWS or max(1, n_pairs // 8)
        budget = _torch_impl.budget_for_rows(rows, n_pairs, n_pairs * (1 + w.n_hard), options, 4)  # float32 logits
        with _torch_impl.chunk_budget(budget):
            return fused_samtone_loss(q, d, n, backend="torch", **w.options())

    return run


def impl_compile(w: Workload, device: str):
    # Every N and grad mode is a new static-shape graph; past dynamo's recompile limit it would
    # silently run eager, so the limit covers a whole sweep (and the sweep resets per workload).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(functools.partial(fused_samtone_loss, backend="torch", **w.options()))


def impl_sentence_transformers(w: Workload, device: str):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    has_doc_anchor = "d2q" in w.directions
    if w.partition == "joint" or not has_doc_anchor:
        mode = "joint"  # without a document anchor both partitions are one softmax
    elif set(w.directions) <= {"q2d", "d2q"}:
        mode = "per_direction"
    else:
        return ("MultipleNegativesRankingLoss cannot express it: its per-direction partition refuses "
                "query_to_query and doc_to_doc")
    loss = MultipleNegativesRankingLoss(model=None, scale=1.0 / TEMPERATURE,
                                        directions=tuple(ST_NAMES[x] for x in w.directions),
                                        partition_mode=mode)

    def run(q, d, n):
        columns = [q, d] + ([] if n is None else [n[:, k] for k in range(n.shape[1])])
        return loss.compute_loss_from_embeddings(columns, labels=None)

    return run


def impl_inf_cl(w: Workload, device: str):
    if device != "cuda":
        return "Inf-CL's kernels run on CUDA only"
    if w.directions != ("q2d", "d2q") or w.n_hard or w.partition != "per_anchor":
        return "Inf-CL computes symmetric InfoNCE without hard negatives only"
    from inf_cl import cal_inf_loss

    scale = torch.tensor(1.0 / TEMPERATURE, device=device)
    head_dim = next(h for h in (256, 128, 64, 32, 16) if w.dim % h == 0)

    def run(q, d, n):
        q, d = F.normalize(q, dim=-1), F.normalize(d, dim=-1)
        return (cal_inf_loss(q, d, scale=scale, head_dim=head_dim)
                + cal_inf_loss(d, q, scale=scale, head_dim=head_dim)) / 2

    return run


IMPLEMENTATIONS: dict[str, tuple[Callable, str | None]] = {
    # name: (factory, the peer module it needs)
    "ours-fused": (impl_fused, None),
    "ours-eager": (impl_eager, None),
    "eager-chunked": (impl_chunked, None),
    "torch.compile": (impl_compile, None),
    "sentence-transformers": (impl_sentence_transformers, "sentence_transformers"),
    "inf-cl": (impl_inf_cl, "inf_cl"),
}


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------
def time_ms(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median milliseconds: triton's do_bench on the GPU, a monotonic clock on the CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, quantiles=[0.5, 0.2, 0.8])[0])
    fn()  # warm-up (compilation, caches)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples)


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
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
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


def our_loss(w: Workload, q, d, n, device: str) -> float | None:
    """The yardstick every row is checked against: our loss (fused where it runs, else eager)."""
    fn = impl_fused(w, device)
    fn = impl_eager(w, device) if isinstance(fn, str) else fn
    try:
        with torch.no_grad():
            return float(fn(q, d, n))
    except Exception as exc:  # noqa: BLE001
        if not is_oom(exc):
            raise
        return None  # rows are then reported unchecked


def make_inputs(w: Workload, n_pairs: int, device: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    shapes = [(n_pairs, w.dim), (n_pairs, w.dim)] + ([(n_pairs, w.n_hard, w.dim)] if w.n_hard else [])
    tensors = [torch.randn(s, generator=g, device=device, dtype=torch.float32).to(dtype).requires_grad_()
               for s in shapes]
    return tensors + [None] * (3 - len(tensors))


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
COLUMNS = ["workload", "n", "d", "h", "dtype", "impl", "status", "fwd_bwd_ms", "fwd_ms", "peak_mem_mb",
           "tflops", "matmul_tflops", "efficiency", "loss", "ours_loss"]


def header(device: str, peers: dict) -> list[str]:
    lines = [f"# date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        lines.append(f"# GPU {props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}")
    else:
        lines.append(f"# CPU {platform.processor() or platform.machine()} x{os.cpu_count()} (no CUDA GPU: "
                     "the fused kernel needs one and is not timed here)")
    triton = _peer_version("triton") or "not installed"
    lines.append(f"# python {platform.python_version()}, torch {torch.__version__}, triton {triton}")
    lines.append("# peers: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in peers.items()))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
        lines.append(f"# commit {commit}")
    except (OSError, subprocess.CalledProcessError):
        pass
    return lines


def format_row(r: dict) -> str:
    def num(key, fmt):
        width = fmt[1:].split(".")[0]
        return format(r[key], fmt) if isinstance(r.get(key), (int, float)) else format("-", f">{width}")
    return (f"{r['workload']:<22}{r['n']:>8}{r['d']:>6} {r['dtype']:<9}{r['impl']:<22}"
            f"{num('fwd_bwd_ms', '>11.3f')}{num('fwd_ms', '>10.3f')}{num('peak_mem_mb', '>11.1f')}"
            f"{num('tflops', '>9.2f')}{num('efficiency', '>7.2f')}  {r['status']}")


TABLE_HEAD = (f"{'workload':<22}{'N':>8}{'D':>6} {'dtype':<9}{'impl':<22}{'fwd+bwd ms':>11}{'fwd ms':>10}"
              f"{'peak MB':>11}{'TFLOP/s':>9}{'eff':>7}  status")


def run_sweep(workloads, sizes, dtypes, impls, device, repeats, emit) -> list[dict]:
    rows, told = [], set()
    matmul_cache = {}
    for w in workloads:
        torch._dynamo.reset()  # torch.compile starts each workload with an empty cache
        for dtype in dtypes:
            out_of_memory = {}  # impl -> N at which it ran out
            for n_pairs in sizes:
                q, d, n = make_inputs(w, n_pairs, device, dtype)
                key = (min(n_pairs, 16384), w.dim)
                if key not in matmul_cache:
                    matmul_cache[key] = matmul_tflops(*key, device, repeats)
                mm_rate, _ = matmul_cache[key]
                ours = our_loss(w, q, d, n, device)
                for name in impls:
                    factory = IMPLEMENTATIONS[name][0]
                    row = dict(workload=w.name, n=n_pairs, d=w.dim, h=w.n_hard,
                               dtype=str(dtype).replace("torch.", ""), impl=name, matmul_tflops=mm_rate)
                    fn = factory(w, device)
                    if isinstance(fn, str):  # cannot express this workload (or needs a GPU): no row
                        if (name, w.name) not in told:
                            told.add((name, w.name))
                            print(f"# {name}: no {w.name} row ({fn})", flush=True)
                        continue
                    if name in out_of_memory:
                        rows.append(emit({**row, "status": f"OOM (skipped: OOM at N={out_of_memory[name]})"}))
                        continue
                    try:
                        row.update(measure(fn, (q, d, n), ours, dtype, device, repeats))
                    except Exception as exc:  # noqa: BLE001 - a peer's failure is a result, not a crash
                        if not is_oom(exc):
                            raise
                        out_of_memory[name] = n_pairs
                        row["status"] = "OOM"
                        if device == "cuda":
                            torch.cuda.empty_cache()
                    if "fwd_bwd_ms" in row:
                        row["tflops"] = flop_count(w, n_pairs) / (row["fwd_bwd_ms"] * 1e-3) / 1e12
                        row["efficiency"] = row["tflops"] / mm_rate
                    rows.append(emit(row))
                del q, d, n  # free this size's inputs before the next, larger one
    return rows


def measure(fn, embeddings, ours: float | None, dtype: torch.dtype, device: str, repeats: int) -> dict:
    """One implementation on one input: its loss checked against ours, then (only if it agrees) its
    forward+backward and forward times and peak memory. OOM propagates to the caller."""
    value = float(fn(*embeddings).detach())
    result = dict(loss=value, ours_loss=ours)
    if ours is not None and not agrees(value, ours, dtype):
        return dict(result, status=f"WRONG: loss {value:.6g} vs ours {ours:.6g}")
    inputs = [x for x in embeddings if x is not None]

    def fwd_bwd():
        return torch.autograd.grad(fn(*embeddings), inputs)

    result["fwd_bwd_ms"] = time_ms(fwd_bwd, device, repeats)
    with torch.no_grad():
        result["fwd_ms"] = time_ms(lambda: fn(*embeddings), device, repeats)
    mem = peak_memory_bytes(fwd_bwd, device)
    result["peak_mem_mb"] = None if mem is None else mem / 2**20
    result["status"] = "ok" if ours is not None else "ok (unchecked: ours ran out of memory)"
    return result


def write_results(rows: list[dict], lines: list[str], out_dir: str, stem: str, plot: bool) -> list[str]:
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
        if plot_results(rows, path, title=" | ".join(x.lstrip("# ") for x in lines[1:3])):
            written.append(path)
    return written


def plot_results(rows: list[dict], path: str, title: str = "") -> bool:
    """Time and peak memory against N (log-log), one line per implementation and dtype."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib is not installed: no plot (pip install -e '.[bench]')")
        return False
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
            style = dict(linestyle="-" if dtype != "float32" else "--", marker="o", label=f"{impl} ({dtype})",
                         color=f"C{list(IMPLEMENTATIONS).index(impl)}")  # one colour per implementation
            axes[i][0].plot([r["n"] for r in pts], [r["fwd_bwd_ms"] for r in pts], **style)
            if has_mem:
                axes[i][1].plot([r["n"] for r in pts], [r["peak_mem_mb"] for r in pts], **style)
        axes[i][0].set(title=f"{wname}: forward + backward", xlabel="N", ylabel="ms", xscale="log", yscale="log")
        if has_mem:
            axes[i][1].set(title=f"{wname}: peak memory above inputs", xlabel="N", ylabel="MiB",
                           xscale="log", yscale="log")
        axes[i][0].legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, 110), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--quick", action="store_true", help="one small size of each workload")
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS), help="workloads")
    p.add_argument("--sizes", nargs="+", type=int, help="batch sizes N (default: the sweep for this device)")
    p.add_argument("--dim", type=int, help="embedding size D for every workload (default: each its own)")
    p.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 and float32 on the GPU, float32 on the CPU")
    p.add_argument("--impls", nargs="+", choices=list(IMPLEMENTATIONS), default=list(IMPLEMENTATIONS),
                   help="implementations")
    p.add_argument("--repeats", type=int, default=5, help="CPU timing repeats (median)")
    p.add_argument("--chunk-rows", type=int, help="eager-chunked's anchor rows per chunk (default: N / 8)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--out", default=RESULTS_DIR, help="folder for the CSV, JSON and PNG")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    global CHUNK_ROWS
    CHUNK_ROWS = args.chunk_rows
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    workloads = [WORKLOADS[name] for name in args.workloads]
    if args.dim:
        workloads = [dataclasses.replace(w, dim=args.dim) for w in workloads]
    if args.quick:
        sizes = [QUICK_SIZE[device]]
    else:
        sizes = args.sizes or (GPU_SIZES if device == "cuda" else CPU_SIZES)
    dtypes = [getattr(torch, x) for x in (args.dtypes or (["bfloat16", "float32"] if device == "cuda"
                                                          else ["float32"]))]
    peers = {IMPLEMENTATIONS[name][1]: _peer_version(IMPLEMENTATIONS[name][1])
             for name in args.impls if IMPLEMENTATIONS[name][1]}
    impls = []
    for name in args.impls:
        peer = IMPLEMENTATIONS[name][1]
        if peer and peers[peer] is None:
            why = " (it runs on CUDA only, so it would have no row here anyway)" if name == "inf-cl" and \
                device != "cuda" else ""
            print(f"# {name}: not installed{why}; pip install -e '.[bench]'")
        else:
            impls.append(name)
    lines = header(device, peers)
    print("\n".join(lines))
    if "ours-fused" in impls and (device != "cuda" or not triton_available()):
        print("# ours-fused: the fused Triton kernel needs a CUDA GPU (and triton); not timed on this machine")
    print("# eff: TFLOP/s of the loss (3 * 2 * D per kept anchor-candidate pair) over the TFLOP/s of a "
          "plain matmul of similar size timed in this run (bfloat16 on a GPU, float32 on a CPU); above 1 "
          "where an implementation does less than that textbook work (the eager one: d2q's logits are q2d's "
          "transposed)")
    print(TABLE_HEAD)

    def emit(row):
        print(format_row(row), flush=True)
        return row

    rows = run_sweep(workloads, sizes, dtypes, impls, device, args.repeats, emit)
    stem = f"speed-{device}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}"
    for path in write_results(rows, lines, args.out, stem, plot=not args.no_plot):
        print(f"# wrote {os.path.relpath(path)}")
    wrong = [r for r in rows if str(r.get("status", "")).startswith("WRONG")]
    if wrong:
        print(f"# {len(wrong)} row(s) disagree with our loss: their times are not reported")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
