"""Speed of the loss implementations, side by side on the same inputs.

    python bench/speed.py            # a few sizes
    python bench/speed.py --quick    # one small size

This first version times the eager torch implementation against the float64 NumPy reference on the
CPU (forward + backward), and checks that both agree before reporting a time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import reference  # noqa: E402
from samtone_kernels import fused_samtone_loss  # noqa: E402

WORKLOADS = {
    "samtone": dict(directions=("q2d", "q2q"), partition="per_anchor", n_hard=0),
    "bidirectional": dict(directions=("q2d", "q2q", "d2q", "d2d"), partition="per_anchor", n_hard=1),
    "clip": dict(directions=("q2d", "d2q"), partition="per_anchor", n_hard=0),
    "gte": dict(directions=("q2d", "q2q", "d2q", "d2d"), partition="joint", n_hard=0),
}


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    sizes = [64] if args.quick else args.sizes

    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, numpy {np.__version__}")
    print("# The fused Triton kernel needs a CUDA GPU; this run times the CPU paths only.")
    print(f"{'workload':<14}{'N':>7}{'D':>6}  {'impl':<16}{'fwd+bwd ms':>12}{'vs reference':>14}")
    for name, w in WORKLOADS.items():
        for n_pairs in sizes:
            rng = np.random.default_rng(0)
            q, d = rng.standard_normal((n_pairs, args.dim)), rng.standard_normal((n_pairs, args.dim))
            n = rng.standard_normal((n_pairs, w["n_hard"], args.dim)) if w["n_hard"] else None
            opts = dict(temperature=0.05, directions=w["directions"], partition=w["partition"], normalize=True)
            expected = reference.samtone_loss(q, d, n, **opts)

            tq, td = torch.tensor(q, dtype=torch.float32), torch.tensor(d, dtype=torch.float32)
            tn = None if n is None else torch.tensor(n, dtype=torch.float32)
            for x in (tq, td, tn):
                if x is not None:
                    x.requires_grad_(True)

            def eager():
                fused_samtone_loss(tq, td, tn, backend="torch", **opts).backward()

            got = float(fused_samtone_loss(tq, td, tn, backend="torch", **opts).detach())
            if abs(got - expected) > 1e-4 * max(1.0, abs(expected)):
                raise SystemExit(f"{name} N={n_pairs}: torch {got} disagrees with the reference {expected}")
            t_ref = median_time(lambda: reference.samtone_grad(q, d, n, **opts), max(1, args.repeats // 2))
            t_eager = median_time(eager, args.repeats)
            for impl, t in (("reference f64", t_ref), ("ours, eager", t_eager)):
                print(f"{name:<14}{n_pairs:>7}{args.dim:>6}  {impl:<16}{t * 1e3:>12.2f}{t_ref / t:>13.1f}x",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
