"""The torch backend's row chunks: time and peak memory of forward + backward, unchunked against
chunked, in one run (ratios; absolute CPU times mean little on a shared machine).

    python bench/torch_chunks.py                       # N = 256 .. 4096, D = 128, SamToNe and bi-SamToNe
    python bench/torch_chunks.py --sizes 512 --dim 64 --repeats 3

Rows: ``default`` is what ``fused_samtone_loss(backend="torch")`` does (one chunk while the logits
fit ``CHUNK_BYTES``, 1 GiB: the unchunked path); ``chunked`` forces chunks of N / 8 anchor rows
(checkpointed: their logits are recomputed in the backward). Ratios are against ``unchunked``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench import HelpFormatter  # noqa: E402
from bench.speed import peak_memory_bytes, time_ms  # noqa: E402
from samtone_kernels import _torch_impl, fused_samtone_loss  # noqa: E402

WORKLOADS = {"samtone": ("q2d", "q2q"), "bi-samtone": ("q2d", "q2q", "d2q", "d2d")}


def measure(n_pairs: int, dim: int, directions: tuple[str, ...], chunk_bytes: int, repeats: int) -> tuple[float, int]:
    """(median ms, peak bytes) of one forward + backward with ``CHUNK_BYTES = chunk_bytes``."""
    g = torch.Generator().manual_seed(0)
    q, d = (torch.randn(n_pairs, dim, generator=g, requires_grad=True) for _ in range(2))

    def step():
        loss = fused_samtone_loss(q, d, directions=directions, normalize=True, backend="torch")
        return torch.autograd.grad(loss, [q, d])

    with _torch_impl.chunk_budget(chunk_bytes):
        return time_ms(step, "cpu", repeats), peak_memory_bytes(step, "cpu")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096], help="N (default: %(default)s)")
    p.add_argument("--dim", type=int, default=128, help="D (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per row (default: %(default)s)")
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS),
                   help="default: %(default)s")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, D = {args.dim}, float32, normalize=True")
    print("| workload | N | variant | chunks | fwd+bwd ms | time / unchunked | peak MiB | peak / unchunked |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.workloads:
        directions = WORKLOADS[name]
        options = _options(directions)
        for n in args.sizes:
            rows = {}
            for variant, budget in (("unchunked", 1 << 62), ("default", _torch_impl.CHUNK_BYTES),
                                    ("chunked", _torch_impl.budget_for_rows(max(1, n // 8), n, n, options, 4))):
                ms, peak = measure(n, args.dim, directions, budget, args.repeats)
                rows[variant] = (ms, peak)
                chunks = -(-n // _torch_impl.chunk_rows(n, n, options, 4, budget=budget))
                base_ms, base_peak = rows["unchunked"]
                print(f"| {name} | {n} | {variant} | {chunks} | {ms:.1f} | {ms / base_ms:.2f} | "
                      f"{peak / 2**20:.1f} | {peak / base_peak:.2f} |", flush=True)
    return 0


def _options(directions):
    from samtone_kernels._options import check_options

    return check_options(directions=directions, partition="per_anchor", doc_anchor_weight=1.0, normalize=True,
                         reduction="mean", backend="torch")


if __name__ == "__main__":
    raise SystemExit(main())
