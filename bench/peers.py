"""What ``bench.speed`` times: the workloads (their directions, partition, hard negatives and D; the
sweep's sizes; the anchor-candidate pairs and FLOPs each counts) and the implementations, ours and
the peers', each built by a factory for a workload on a device.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.harness import is_oom
from samtone_kernels import _torch_impl, fused_samtone_loss, triton_available
from samtone_kernels._options import check_options
from samtone_kernels.integrations.sentence_transformers import DIRECTION_NAMES

TEMPERATURE = 0.05
# Our direction names -> sentence-transformers' (the inverse of its DIRECTION_NAMES, once that exists).
ST_NAMES = {ours: theirs for theirs, ours in DIRECTION_NAMES.items()}  # ours -> sentence-transformers'


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    directions: tuple[str, ...]
    partition: str
    n_hard: int
    dim: int
    matryoshka: tuple[int, ...] | None = None  # the prefixes' dims, D last: their losses summed

    def options(self) -> dict:
        options = dict(temperature=TEMPERATURE, directions=self.directions, partition=self.partition, normalize=True)
        if self.matryoshka:
            options["matryoshka_dims"] = self.matryoshka
        return options


WORKLOADS = {
    w.name: w
    for w in [
        Workload("samtone", ("q2d", "q2q"), "per_anchor", 0, 768),
        Workload("bidirectional-samtone", ("q2d", "q2q", "d2q", "d2d"), "per_anchor", 1, 1024),
        Workload("symmetric-infonce", ("q2d", "d2q"), "per_anchor", 0, 768),
        Workload("gte", ("q2d", "q2q", "d2q", "d2d"), "joint", 0, 768),
        # Every prefix's SamToNe loss summed (Matryoshka): FLOPs and pairs are those of the full-D loss.
        Workload("matryoshka-samtone", ("q2d", "q2q"), "per_anchor", 0, 768, (64, 128, 256, 512, 768)),
    ]
}


def with_dim(w: Workload, dim: int) -> Workload:
    """The workload at another D, its Matryoshka prefixes scaled with it (those that stay distinct)."""
    prefixes = None
    if w.matryoshka:
        prefixes = tuple(sorted({max(1, m * dim // w.dim) for m in w.matryoshka[:-1]} - {dim})) + (dim,)
    return dataclasses.replace(w, dim=dim, matryoshka=prefixes)


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
    """3 * 2 * D * P: one logit matmul forward, two in the backward (recomputation not counted); for
    a Matryoshka workload, those of its full-D loss alone (what a one-pass computation needs)."""
    return 3 * 2 * w.dim * pair_count(w, n_pairs)


def make_inputs(w: Workload, n_pairs: int, device: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    shapes = [(n_pairs, w.dim), (n_pairs, w.dim)] + ([(n_pairs, w.n_hard, w.dim)] if w.n_hard else [])
    tensors = [
        torch.randn(s, generator=g, device=device, dtype=torch.float32).to(dtype).requires_grad_() for s in shapes
    ]
    return tensors + [None] * (3 - len(tensors))


# --------------------------------------------------------------------------------------------------
# Implementations: each returns a loss function of (q, d, n) or None where it cannot express w
# --------------------------------------------------------------------------------------------------
# A factory returns the implementation of a workload on a device, or the reason it has no row there.
def impl_fused(w: Workload, device: str):
    if device != "cuda" or not triton_available():
        return "the fused Triton kernel needs a CUDA GPU and triton"
    return functools.partial(fused_samtone_loss, backend="triton", **w.options())


def impl_hybrid(w: Workload, device: str):
    if device != "cuda" or not triton_available():
        return "the hybrid path's epilogues are Triton kernels: it needs a CUDA GPU and triton"
    return functools.partial(fused_samtone_loss, backend="hybrid", **w.options())


def impl_auto(w: Workload, device: str):
    if device != "cuda" or not triton_available():
        return "backend='auto' is the eager backend off CUDA (the ours-eager row)"
    return functools.partial(fused_samtone_loss, backend="auto", **w.options())


def impl_eager(w: Workload, device: str):
    return functools.partial(fused_samtone_loss, backend="torch", **w.options())


CHUNK_ROWS: int | None = None  # eager-chunked's rows per chunk (--chunk-rows); None: N / 8


def impl_chunked(w: Workload, device: str):
    options = check_options(
        directions=w.directions, partition=w.partition, doc_anchor_weight=1.0, normalize=True, reduction="mean"
    )

    def run(q, d, n):
        n_pairs = q.shape[0]
        rows = CHUNK_ROWS or max(1, n_pairs // 8)
        # float32 logits, one set per Matryoshka prefix (the eager backend holds every prefix's at once)
        logit_bytes = 4 * (len(w.matryoshka) if w.matryoshka else 1)
        budget = _torch_impl.budget_for_rows(rows, n_pairs, n_pairs * (1 + w.n_hard), options, logit_bytes)
        with _torch_impl.chunk_budget(budget):
            return fused_samtone_loss(q, d, n, backend="torch", **w.options())

    return run


def impl_compile(w: Workload, device: str):
    # Every N and grad mode is a new static-shape graph; past dynamo's recompile limit it would
    # silently run eager, so the limit covers a whole sweep (and the sweep resets per workload).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(functools.partial(fused_samtone_loss, backend="torch", **w.options()))


def impl_per_prefix(w: Workload, device: str):
    if not w.matryoshka:
        return "a Matryoshka workload's loss per prefix (this workload has none)"

    def run(q, d, n):  # what wrapping ours in MatryoshkaLoss computes: one loss per prefix
        options = {k: v for k, v in w.options().items() if k != "matryoshka_dims"}
        return sum(
            fused_samtone_loss(q[:, :m], d[:, :m], None if n is None else n[..., :m], backend="torch", **options)
            for m in w.matryoshka
        )

    return run


def impl_sentence_transformers(w: Workload, device: str):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    has_doc_anchor = "d2q" in w.directions
    if w.partition == "joint" or not has_doc_anchor:
        mode = "joint"  # without a document anchor both partitions are one softmax
    elif set(w.directions) <= {"q2d", "d2q"}:
        mode = "per_direction"
    else:
        return (
            "MultipleNegativesRankingLoss cannot express it: its per-direction partition refuses "
            "query_to_query and doc_to_doc"
        )
    loss = MultipleNegativesRankingLoss(
        model=None, scale=1.0 / TEMPERATURE, directions=tuple(ST_NAMES[x] for x in w.directions), partition_mode=mode
    )

    def run(q, d, n):
        columns = [q, d] + ([] if n is None else [n[:, k] for k in range(n.shape[1])])
        if not w.matryoshka:
            return loss.compute_loss_from_embeddings(columns, labels=None)
        # MatryoshkaLoss(model, MNRL)'s computation on the embeddings: MNRL on each truncation, summed.
        return sum(loss.compute_loss_from_embeddings([c[:, :m] for c in columns], labels=None) for m in w.matryoshka)

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
        return (
            cal_inf_loss(q, d, scale=scale, head_dim=head_dim) + cal_inf_loss(d, q, scale=scale, head_dim=head_dim)
        ) / 2

    return run


IMPLEMENTATIONS: dict[str, tuple[Callable, str | None]] = {
    # name: (factory, the peer module it needs)
    "ours-fused": (impl_fused, None),
    "ours-hybrid": (impl_hybrid, None),
    "ours-auto": (impl_auto, None),
    "ours-eager": (impl_eager, None),
    "eager-chunked": (impl_chunked, None),
    "torch.compile": (impl_compile, None),
    "ours-per-prefix": (impl_per_prefix, None),
    "sentence-transformers": (impl_sentence_transformers, "sentence_transformers"),
    "inf-cl": (impl_inf_cl, "inf_cl"),
}


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
