"""Speed and memory of the fused loss, side by side with what a user would use instead.

    python -m bench.speed                 # the full sweep for this machine (GPU: N = 4096 .. 262144)
    python -m bench.speed --quick         # one small size of each workload
    python -m bench.speed --workloads samtone --sizes 8192 16384 --dtypes bfloat16

Implementations, timed on the same inputs in the same run:
  ours-fused            the Triton kernel (CUDA only)
  ours-hybrid           cuBLAS GEMMs into float32 logit chunks + Triton epilogues (CUDA only)
  ours-auto             backend="auto": the faster of the two, measured on the first call (CUDA only)
  ours-eager            the eager torch backend as shipped (row chunks only past 1 GiB of logits)
  eager-chunked         the baseline a careful PyTorch user writes instead of a kernel: the eager loss
                        in row chunks of --chunk-rows anchors (default N / 8), each under
                        torch.utils.checkpoint (O(c * M) memory, 4 matmul units for 3 textbook)
  torch.compile         torch.compile of the eager implementation
  sentence-transformers MultipleNegativesRankingLoss.compute_loss_from_embeddings (cosine, scale 1/tau),
                        for every workload it can express
  inf-cl                inf_cl.cal_inf_loss, symmetric InfoNCE only (CUDA only)

Every row checks that the implementation's loss agrees with ours before its time is reported. The
implementations that agree are timed together, their runs interleaved (one run of each in turn, with
a plain matmul of similar size among them, the yardstick of `eff`), so that the load of a busy machine
hits them alike; each row carries its 20th-80th percentile spread and is flagged noisy when that is
too wide to read. On a CPU the table leaves out TFLOP/s (a few hundredths there): times, peak memory
and eff inform. Results are printed as each size completes and written to bench/results/ as CSV, JSON
and a PNG plot. Run it from the repository root; the harness (timing, memory, files) is
bench/harness.py, the workloads and implementations bench/peers.py.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import torch

try:
    from bench import HelpFormatter, harness, peers
except ModuleNotFoundError as exc:  # run by path (python bench/speed.py): no package bench to import
    if exc.name != "bench":
        raise
    raise SystemExit(
        "bench/speed.py is part of the bench package: run `python -m bench.speed` from the repository root"
    ) from None
from samtone_kernels import backend_choices, triton_available

CPU_NOTE = "no CUDA GPU: the fused kernel needs one and is not timed here"


def run_sweep(workloads, sizes, dtypes, impls, device, repeats, emit) -> list[dict]:
    """Every (workload, dtype, size): each implementation's loss checked against ours, then the ones
    that agree timed together, their repetitions interleaved with each other's and with a plain
    matmul of similar size (the yardstick of ``efficiency``), and their peak memory measured. The
    rows of a size are emitted when it is done."""
    rows, told = [], set()
    total, done, started = len(workloads) * len(dtypes) * len(sizes), 0, time.perf_counter()
    for w in workloads:
        torch._dynamo.reset()  # torch.compile starts each workload with an empty cache
        for dtype in dtypes:
            out_of_memory = {}  # impl -> N at which it ran out
            for n_pairs in sizes:
                if done:  # what is left, from the pace so far
                    left = (time.perf_counter() - started) / done * (total - done)
                    print(f"# progress: {done}/{total} problem sizes done, about {left / 60:.1f} min left", flush=True)
                done += 1
                embeddings = peers.make_inputs(w, n_pairs, device, dtype)
                ours = peers.our_loss(w, *embeddings, device)
                size_rows, timed = [], []  # timed: (row, fn) of the implementations that agree
                for name in impls:
                    fn = peers.IMPLEMENTATIONS[name][0](w, device)
                    if isinstance(fn, str):  # cannot express this workload (or needs a GPU): no row
                        if (name, w.name) not in told:
                            told.add((name, w.name))
                            print(f"# {name}: no {w.name} row ({fn})", flush=True)
                        continue
                    row = dict(
                        workload=w.name,
                        n=n_pairs,
                        d=w.dim,
                        h=w.n_hard,
                        dtype=str(dtype).replace("torch.", ""),
                        impl=name,
                    )
                    size_rows.append(row)
                    if name in out_of_memory:
                        row["status"] = f"OOM (skipped: OOM at N={out_of_memory[name]})"
                        continue
                    try:
                        row.update(check(fn, embeddings, ours, dtype))
                    except Exception as exc:  # noqa: BLE001 - a peer's failure is a result, not a crash
                        if not harness.is_oom(exc):
                            raise
                        row["status"] = "OOM"
                        if device == "cuda":
                            torch.cuda.empty_cache()
                    if "status" not in row:
                        timed.append((row, fn))
                if timed:
                    yardstick = harness.matmul_yardstick(n_pairs, w.dim, device)
                    results, matmul_ms = measure_together(
                        [fn for _, fn in timed], embeddings, device, repeats, yardstick[0]
                    )
                    mm_rate = None if matmul_ms is None else yardstick[1] / (matmul_ms * 1e-3) / 1e12
                    for (row, _), result in zip(timed, results):
                        row.update(result, matmul_tflops=mm_rate)
                        if "fwd_bwd_ms" in row:
                            row["tflops"] = peers.flop_count(w, n_pairs) / (row["fwd_bwd_ms"] * 1e-3) / 1e12
                            row["efficiency"] = None if mm_rate is None else row["tflops"] / mm_rate
                        row.setdefault("status", "ok" if ours is not None else "ok (unchecked: ours ran out of memory)")
                for row in size_rows:
                    if row["status"] == "OOM":
                        out_of_memory[row["impl"]] = n_pairs
                    rows.append(emit(row))
                del embeddings  # free this size's inputs before the next, larger one
    return rows


def check(fn, embeddings, ours: float | None, dtype: torch.dtype) -> dict:
    """One implementation's loss on one input against ours: its loss and ours, with status WRONG when
    they disagree (then it is not timed). OOM propagates to the caller."""
    value = float(fn(*embeddings).detach())
    result = dict(loss=value, ours_loss=ours)
    if ours is not None and not harness.agrees(value, ours, dtype):
        result["status"] = f"WRONG: loss {value:.6g} vs ours {ours:.6g}"
    return result


def measure_together(fns, embeddings, device: str, repeats: int, yardstick=None) -> tuple[list[dict], float | None]:
    """Several implementations on one input: forward+backward times (median, 20th and 80th
    percentile), forward times and peak memory, the times with the implementations' repetitions
    interleaved (``harness.time_interleaved_ms``), ``yardstick`` (a plain matmul) timed among the
    forward+backward ones. Per implementation a dict of results (status OOM where it ran out of
    memory), and the yardstick's median milliseconds (None without one or if it ran out)."""
    inputs = [x for x in embeddings if x is not None]

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(*embeddings), inputs)

    def forward(fn):
        return lambda: fn(*embeddings)

    steps = [fwd_bwd(fn) for fn in fns]
    timings = harness.time_interleaved_ms(steps + ([yardstick] if yardstick else []), device, repeats)
    matmul = timings.pop() if yardstick else None
    results = [{} for _ in fns]
    for result, timing in zip(results, timings):
        if isinstance(timing, BaseException):
            result["status"] = "OOM"
        else:
            median, low, high = timing
            note = harness.spread_note(median, low, high)
            result.update(fwd_bwd_ms=median, fwd_bwd_p20_ms=low, fwd_bwd_p80_ms=high, note=note)
    alive = [i for i, result in enumerate(results) if "status" not in result]
    with torch.no_grad():
        forwards = harness.time_interleaved_ms([forward(fns[i]) for i in alive], device, repeats)
    for i, timing in zip(alive, forwards):
        if isinstance(timing, BaseException):
            results[i] = {"status": "OOM"}
        else:
            results[i]["fwd_ms"] = timing[0]
    for i in [i for i in alive if "status" not in results[i]]:
        try:
            mem = harness.peak_memory_bytes(steps[i], device)
        except Exception as exc:  # noqa: BLE001
            if not harness.is_oom(exc):
                raise
            results[i] = {"status": "OOM"}
            continue
        results[i]["peak_mem_mb"] = None if mem is None else mem / 2**20
    return results, None if matmul is None or isinstance(matmul, BaseException) else matmul[0]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--quick", action="store_true", help="one small size of each workload")
    p.add_argument(
        "--workloads", nargs="+", choices=list(peers.WORKLOADS), default=list(peers.WORKLOADS), help="workloads"
    )
    p.add_argument("--sizes", nargs="+", type=int, help="batch sizes N (default: the sweep for this device)")
    p.add_argument("--dim", type=int, help="embedding size D for every workload (default: each its own)")
    p.add_argument(
        "--dtypes",
        nargs="+",
        choices=["bfloat16", "float16", "float32"],
        help="default: bfloat16 and float32 on the GPU, float32 on the CPU",
    )
    p.add_argument(
        "--impls",
        nargs="+",
        choices=list(peers.IMPLEMENTATIONS),
        default=list(peers.IMPLEMENTATIONS),
        help="implementations",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="CPU: timed runs of each implementation, interleaved with the others' (GPU: as many as fill "
        "about 100 ms each, at least 3)",
    )
    p.add_argument("--chunk-rows", type=int, help="eager-chunked's anchor rows per chunk (default: N / 8)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--out", default=harness.RESULTS_DIR, help="folder for the CSV, JSON and PNG")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    peers.CHUNK_ROWS = args.chunk_rows
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    workloads = [peers.WORKLOADS[name] for name in args.workloads]
    if args.dim:
        workloads = [peers.with_dim(w, args.dim) for w in workloads]
    if args.quick:
        sizes = [peers.QUICK_SIZE[device]]
    else:
        sizes = args.sizes or (peers.GPU_SIZES if device == "cuda" else peers.CPU_SIZES)
    dtypes = [
        getattr(torch, x) for x in (args.dtypes or (["bfloat16", "float32"] if device == "cuda" else ["float32"]))
    ]
    needs = {name: peers.IMPLEMENTATIONS[name][1] for name in args.impls}  # the peer module each needs
    versions = {peer: harness.peer_version(peer) for peer in needs.values() if peer}
    impls = []
    for name in args.impls:
        peer = needs[name]
        if peer and versions[peer] is None:
            why = (
                " (it runs on CUDA only, so it would have no row here anyway)"
                if name == "inf-cl" and device != "cuda"
                else ""
            )
            print(f"# {name}: not installed{why}; pip install -e '.[bench]'")
        else:
            impls.append(name)
    lines = harness.header(device, versions, cpu_note=CPU_NOTE)
    print("\n".join(lines))
    if "ours-fused" in impls and (device != "cuda" or not triton_available()):
        print("# ours-fused: the fused Triton kernel needs a CUDA GPU (and triton); not timed on this machine")
    print(
        "# times: median of the timed runs, the implementations' runs of one size interleaved (one run of "
        "each in turn), so that the load of a busy machine hits them alike; a row whose 20th-80th "
        f"percentile spread exceeds {harness.NOISY_SPREAD:.0%} of its median is flagged noisy (the CSV "
        "holds the percentiles)"
    )
    print(
        "# eff: the loss's FLOP rate (3 * 2 * D per kept anchor-candidate pair) over that of a plain matmul "
        "of similar size timed among the rows (bfloat16 on a GPU, float32 on a CPU); above 1 where an "
        "implementation does less than that textbook work (the eager one: d2q's logits are q2d's transposed)"
    )
    if device != "cuda":
        print(
            "# CPU: no TFLOP/s column (a few hundredths, which tells nothing; the CSV keeps it): read the times, "
            "the peak memory and eff, as ratios between the rows of this run"
        )
    if not args.quick:
        print("# the full sweep can take many minutes on a small machine: --quick runs one small size of each")
    print(harness.table_head(device))

    def emit(row):
        print(harness.format_row(row, device), flush=True)
        return row

    rows = run_sweep(workloads, sizes, dtypes, impls, device, args.repeats, emit)
    for key, chosen in backend_choices().items():  # what ours-auto measured and chose, per key
        print(f"# backend='auto' chose {chosen!r} for {key}")
    stem = f"speed-{device}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}"
    for path in harness.write_results(
        rows, lines, args.out, stem, plot=not args.no_plot, impls=list(peers.IMPLEMENTATIONS)
    ):
        print(f"# wrote {os.path.relpath(path)}")
    wrong = [r for r in rows if str(r.get("status", "")).startswith("WRONG")]
    if wrong:
        print(f"# {len(wrong)} row(s) disagree with our loss: their times are not reported")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
