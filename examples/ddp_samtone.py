"""Train a small pair of towers with DDP, using every rank's batch as negatives.

    torchrun --standalone --nproc_per_node=2 examples/ddp_samtone.py    # CPU, gloo
    torchrun --standalone --nproc_per_node=8 examples/ddp_samtone.py --device cuda

Each rank encodes its own pairs; ``gather_across_devices=True`` makes the queries, documents and hard
negatives of all ranks the candidates of every rank's anchors, with exact gradients: DDP's average
of the ranks' gradients equals single-process training on the concatenated batch.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from samtone_kernels import SamToNeLoss


class Towers(torch.nn.Module):
    """Asymmetric dual encoder: separate query and document towers."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.query = torch.nn.Sequential(torch.nn.Linear(dim_in, 64), torch.nn.GELU(), torch.nn.Linear(64, dim_out))
        self.doc = torch.nn.Sequential(torch.nn.Linear(dim_in, 64), torch.nn.GELU(), torch.nn.Linear(64, dim_out))

    def forward(self, queries, docs, negatives):
        return self.query(queries), self.doc(docs), self.doc(negatives)


def synthetic_batch(batch: int, dim: int, rank: int, step: int, device):
    """Pairs whose document is a noisy copy of its query; one random hard negative each."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    queries = torch.randn(batch, dim, generator=g)
    docs = queries + 0.3 * torch.randn(batch, dim, generator=g)
    negatives = torch.randn(batch, 1, dim, generator=g)
    topic = torch.randint(0, 4 * batch, (batch,), generator=g)  # repeated topics: never negatives
    return queries.to(device), docs.to(device), negatives.to(device), topic.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32, help="pairs per rank")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if "RANK" not in os.environ:
        raise SystemExit(
            "examples/ddp_samtone.py runs one process per rank: start it with torchrun, e.g. "
            "torchrun --standalone --nproc_per_node=2 examples/ddp_samtone.py"
        )

    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" else "cpu"
    torch.manual_seed(0)  # the same initial weights on every rank
    model = DDP(Towers(32, 16).to(device))
    loss_fn = SamToNeLoss(
        temperature=0.05, directions=("q2d", "q2q", "d2q", "d2d"), normalize=True, gather_across_devices=True
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    for step in range(args.steps):
        queries, docs, negatives, topic = synthetic_batch(args.batch, 32, rank, step, device)
        loss = loss_fn(*model(queries, docs, negatives), group_ids=topic)
        opt.zero_grad()
        loss.backward()  # DDP averages the gradients; the gather already summed the candidates' parts
        opt.step()
        reported = loss.detach().clone()
        dist.all_reduce(reported)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {reported.item() / world:.4f}  ({world} ranks x {args.batch} pairs)")
    dist.barrier()  # no rank tears its connections down while a peer still finishes a collective
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
