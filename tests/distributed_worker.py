"""Worker of tests/test_distributed.py: one rank of a gloo process group on the CPU.

Every rank builds the same random full batches, keeps its own slice of pairs, computes the loss with
``gather_across_devices=True`` (some configurations with Matryoshka prefixes) and checks it against
the single-process loss on the full batch:
per-pair losses equal, the ranks' reduced losses average to the single-process one, and each rank's
gradient for its rows is W times the single-process gradient (DDP then averages them back).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.distributed as dist

import helpers
from samtone_kernels import fused_samtone_loss

DIRECTION_SETS = helpers.DIRECTION_SETS + helpers.JOINT_ONLY_SETS  # the partition is picked per set below
HARDNESS_MODES = [None, *helpers.HARDNESS_MODES]


def configurations(count: int, seed: int):
    rng = np.random.default_rng(seed)
    for k in range(count):
        directions = DIRECTION_SETS[(k * 5 + seed) % len(DIRECTION_SETS)]
        joint_only = "d2d" in directions and "d2q" not in directions
        partition = "joint" if joint_only else ["per_anchor", "joint"][k % 2]
        yield dict(
            directions=directions,
            hardness_mode=HARDNESS_MODES[(k + seed) % len(HARDNESS_MODES)],
            partition=partition,
            doc_anchor_weight=1.0
            if partition == "joint" or "d2q" not in directions
            else float(rng.choice([1.0, 0.1, 2.0])),
            normalize=bool(k % 3 == 0),
            reduction=["mean", "sum", "none"][k % 3],
            n_hard=int(rng.integers(0, 3)),
            groups=bool(k % 2 == 0),
            temperature=float(rng.choice([0.05, 0.5, 2.0])),
            dim=int(rng.integers(1, 9)),
            matryoshka=bool(k % 3 == 2),  # two prefixes (D - 1, D) where D >= 3
            seed=int(rng.integers(0, 2**31)),
        )


def check(rank: int, world: int, sizes: list[int], backend: str, cfg: dict) -> None:
    dtype = torch.float64 if backend == "torch" else torch.float32
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    total, offset = sum(sizes), sum(sizes[:rank])
    local = slice(offset, offset + sizes[rank])
    g = torch.Generator().manual_seed(cfg["seed"])  # the same full batch on every rank
    full = [torch.randn(total, cfg["dim"], generator=g, dtype=dtype) for _ in range(2)]
    if cfg["n_hard"]:
        full.append(torch.randn(total, cfg["n_hard"], cfg["dim"], generator=g, dtype=dtype))
    groups = torch.randint(0, 3, (total,), generator=g) if cfg["groups"] else None  # ties across ranks
    options = {k: cfg[k] for k in ("directions", "partition", "doc_anchor_weight", "normalize", "reduction")}
    if cfg["hardness_mode"]:
        options.update(hardness_mode=cfg["hardness_mode"], hardness_strength=3.0)
    if cfg["matryoshka"] and cfg["dim"] >= 3:
        # Each prefix normalised (its norms' gradients cross ranks too); D - 1 of D dims, as a shorter
        # prefix's normalisation is ill-conditioned beyond float32's tolerance here.
        options.update(matryoshka_dims=(cfg["dim"] - 1, cfg["dim"]), matryoshka_weights=(0.5, 1.0), normalize=True)

    def run(tensors, group_ids, gather):
        leaves = [x.clone().requires_grad_() for x in tensors]
        tau = torch.tensor(cfg["temperature"], dtype=dtype, requires_grad=True)
        loss = fused_samtone_loss(
            *leaves,
            *([None] if len(leaves) == 2 else []),
            temperature=tau,
            group_ids=group_ids,
            backend=backend,
            gather_across_devices=gather,
            **options,
        )
        loss.sum().backward()
        return loss.detach(), [x.grad for x in leaves], tau.grad

    single, single_grads, single_tau = run(full, groups, gather=False)
    ours, grads, tau_grad = run([x[local] for x in full], None if groups is None else groups[local], gather=True)

    if cfg["reduction"] == "none":
        torch.testing.assert_close(ours, single[local], **tol)
        factor = 1.0  # the gradient of the sum of the local losses, summed over ranks, is the single one
    else:
        reduced = ours.clone()
        dist.all_reduce(reduced)
        torch.testing.assert_close(reduced / world, single, **tol)
        factor = float(world)
    for name, got, want in zip(["queries", "docs", "hard_negatives"], grads, single_grads):
        torch.testing.assert_close(got, factor * want[local], **tol, msg=lambda m, name=name: f"{name}: {m} ({cfg})")
    # The temperature is shared by all ranks: like every row, its gradients over the ranks sum to
    # ``factor`` times the single-process gradient (DDP's average then divides by W).
    summed = tau_grad.clone()
    dist.all_reduce(summed)
    torch.testing.assert_close(summed, factor * single_tau, **tol)


def check_disagreeing_ranks_raise(rank: int) -> None:
    """Every rank raises the same ValueError when the ranks' shapes disagree."""
    n_hard = 1 if rank == 1 else 2
    q, d = torch.randn(3, 4), torch.randn(3, 4)
    try:
        fused_samtone_loss(q, d, torch.randn(3, n_hard, 4), backend="torch", gather_across_devices=True)
    except ValueError as exc:
        assert "hard_negatives" in str(exc), exc
    else:
        raise AssertionError("no error for ranks with different H")


def main(rank: int, world: int, init_method: str, batches: list[tuple[list[int], int]]) -> None:
    """Rank ``rank`` of ``world``: for each (local sizes, count) of ``batches``, ``count``
    configurations on every backend."""
    import faulthandler

    faulthandler.enable()  # a crash in a collective prints where it happened
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: no hostname lookup to pick a device
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        for i, (sizes, count) in enumerate(batches):
            for backend in ("torch", "triton", "hybrid"):
                for cfg in configurations(count, seed=world + 7 * i):
                    check(rank, world, sizes, backend, cfg)
        check_disagreeing_ranks_raise(rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Every check has passed and the group is destroyed. torch 2.13's gloo intermittently aborts
    # ("terminate called without an active exception") while such a worker's interpreter tears
    # down afterwards (seen in about 1 run in 7 here, always after this point), so leave at once.
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(0)
