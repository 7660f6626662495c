"""The torch backend's row chunks: time and peak memory of forward + backward, unchunked against
chunked, in one run (ratios; absolute CPU times mean little on a shared machine).

    python -m bench.torch_chunks                       # N = 256 .. 4096, D = 128, SamToNe and bi-SamToNe
    python -m bench.torch_chunks --sizes 512 --dim 64 --repeats 3

Rows: ``default`` is what ``fused_samtone_loss(backend="torch")`` does (one chunk while the logits
fit ``CHUNK_BYTES``, 1 GiB: the unchunked path); ``chunked`` forces chunks of N / 8 anchor rows
(checkpointed: their logits are recomputed in the backward). Ratios are against ``unchunked``.

A second table, for the workloads with d2q: the log-partitions alone (``row_lse_torch``, one chunk),
``shared`` as one process computes them (D Q^T taken from Q D^T, one matmul for both blocks) against
``apart`` (the candidates passed as copies of the anchors, as a gathered batch is: D Q^T a matmul of
its own).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

try:
    from bench import HelpFormatter
    from bench.harness import peak_memory_bytes, time_ms
except ModuleNotFoundError as exc:  # run by path (python bench/torch_chunks.py): no package bench to import
    if exc.name != "bench":
        raise
    raise SystemExit(
        "bench/torch_chunks.py is part of the bench package: run `python -m bench.torch_chunks` "
        "from the repository root"
    ) from None
from samtone_kernels import _torch_impl, fused_samtone_loss

WORKLOADS = {"samtone": ("q2d", "q2q"), "bi-samtone": ("q2d", "q2q", "d2q", "d2d"), "symmetric": ("q2d", "d2q")}


def measure(n_pairs: int, dim: int, directions: tuple[str, ...], chunk_bytes: int, repeats: int) -> tuple[float, int]:
    """(median ms, peak bytes) of one forward + backward with ``CHUNK_BYTES = chunk_bytes``."""
    g = torch.Generator().manual_seed(0)
    q, d = (torch.randn(n_pairs, dim, generator=g, requires_grad=True) for _ in range(2))

    def step():
        loss = fused_samtone_loss(q, d, directions=directions, normalize=True, backend="torch")
        return torch.autograd.grad(loss, [q, d])

    with _torch_impl.chunk_budget(chunk_bytes):
        return time_ms(step, "cpu", repeats), peak_memory_bytes(step, "cpu")


def measure_d2q(n_pairs: int, dim: int, directions: tuple[str, ...], apart: bool, repeats: int) -> float:
    """Median ms of forward + backward of ``row_lse_torch`` in one chunk; ``apart``: the candidates are
    copies of the anchors, so the d2q block is not taken from the q2d one."""
    g = torch.Generator().manual_seed(0)
    q, d = (F.normalize(torch.randn(n_pairs, dim, generator=g), dim=-1).requires_grad_() for _ in range(2))
    options = _options(directions)

    def step():
        q_all, d_all = (q * 1, d * 1) if apart else (q, d)
        lse = _torch_impl.row_lse_torch(q, d, q_all, d_all, None, 20.0, None, 0, options, budget=1 << 62)
        return torch.autograd.grad(lse.sum(), [q, d])

    return time_ms(step, "cpu", repeats)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.torch_chunks", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096], help="N (default: %(default)s)")
    p.add_argument("--dim", type=int, default=128, help="D (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per row (default: %(default)s)")
    p.add_argument(
        "--workloads",
        nargs="+",
        choices=list(WORKLOADS),
        default=["samtone", "bi-samtone"],
        help="default: %(default)s",
    )
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
            for variant, budget in (
                ("unchunked", 1 << 62),
                ("default", _torch_impl.CHUNK_BYTES),
                ("chunked", _torch_impl.budget_for_rows(max(1, n // 8), n, n, options, 4)),
            ):
                ms, peak = measure(n, args.dim, directions, budget, args.repeats)
                rows[variant] = (ms, peak)
                chunks = -(-n // _torch_impl.chunk_rows(n, n, options, 4, budget=budget))
                base_ms, base_peak = rows["unchunked"]
                print(
                    f"| {name} | {n} | {variant} | {chunks} | {ms:.1f} | {ms / base_ms:.2f} | "
                    f"{peak / 2**20:.1f} | {peak / base_peak:.2f} |",
                    flush=True,
                )
    with_d2q = [name for name in args.workloads if "d2q" in WORKLOADS[name]]
    if with_d2q:
        print("\n| workload | N | d2q block | fwd+bwd ms | time / apart |\n|---|---|---|---|---|")
    for name in with_d2q:
        for n in args.sizes:
            ms = {apart: measure_d2q(n, args.dim, WORKLOADS[name], apart, args.repeats) for apart in (True, False)}
            for apart in (True, False):
                print(
                    f"| {name} | {n} | {'apart' if apart else 'shared'} | {ms[apart]:.1f} | "
                    f"{ms[apart] / ms[True]:.2f} |",
                    flush=True,
                )
    return 0


def _options(directions):
    from samtone_kernels._options import check_options

    return check_options(
        directions=directions, partition="per_anchor", doc_anchor_weight=1.0, normalize=True, reduction="mean"
    )


if __name__ == "__main__":
    raise SystemExit(main())
