"""Towers on frozen encoders, fine-tuning the encoder itself, and the retrieval metrics."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from samtone_kernels import fused_samtone_loss

TEMPERATURE = 0.05

# "groups": the batch's group ids are passed as ``group_ids`` (which ids: the experiment's choice).
LOSSES = {
    "infonce": dict(directions=("q2d",)),
    "samtone": dict(directions=("q2d", "q2q")),
    "bi-samtone": dict(directions=("q2d", "q2q", "d2q", "d2d")),
    "symmetric": dict(directions=("q2d", "d2q")),
    "dance": dict(directions=("q2d", "d2q"), doc_anchor_weight=0.1),
    "gte": dict(directions=("q2d", "q2q", "d2q", "d2d"), partition="joint"),
    "samtone+groups": dict(directions=("q2d", "q2q"), groups=True),
    "bi-samtone+groups": dict(directions=("q2d", "q2q", "d2q", "d2d"), groups=True),
    # "+margin": presumed false negatives dropped by similarity (``false_negative_margin``, cosine).
    "infonce+margin": dict(directions=("q2d",), false_negative_margin=0.1),
    "samtone+margin": dict(directions=("q2d", "q2q"), false_negative_margin=0.1),
    # "+dups" (fine-tuning only): SamToNeRankingLoss's mask_duplicates, identical anchor or positive
    # texts of a batch share a group.
    "samtone+dups": dict(directions=("q2d", "q2q"), dups=True),
}
TOWERS = ("sde", "ade", "ade-spl")
Batches = Callable[[np.random.Generator], "list[np.ndarray]"]


def _identity(dim: int) -> torch.nn.Linear:
    layer = torch.nn.Linear(dim, dim)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(dim))
        layer.bias.zero_()
    return layer


class Towers(torch.nn.Module):
    """SDE: one shared projection; ADE: separate query / document projections; ADE-SPL: separate
    projections followed by a shared one. Every projection starts at the identity."""

    def __init__(self, kind: str, dim: int) -> None:
        super().__init__()
        self.kind = kind
        self.shared = _identity(dim) if kind in ("sde", "ade-spl") else None
        self.query = _identity(dim) if kind in ("ade", "ade-spl") else None
        self.doc = _identity(dim) if kind in ("ade", "ade-spl") else None

    def encode(self, x: torch.Tensor, side: str) -> torch.Tensor:
        own = self.query if side == "query" else self.doc
        if own is not None:
            x = own(x)
        if self.shared is not None:
            x = self.shared(x)
        return x


def train_towers(
    kind: str,
    loss_name: str,
    q: np.ndarray,
    d: np.ndarray,
    groups: np.ndarray | None,
    *,
    epochs: int,
    batches: Batches,
    lr: float,
    seed: int,
    device: str,
    doc_of: np.ndarray | None = None,
) -> Towers:
    """Train towers on frozen embeddings: pair k is (q[k], d[doc_of[k]]) (``doc_of`` defaults to k);
    ``batches(rng)`` lays out one epoch; ``groups[k]`` is pair k's group id where the loss masks groups."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cfg = dict(LOSSES[loss_name])
    use_groups = cfg.pop("groups", False)
    if cfg.pop("dups", False):
        raise ValueError(f"{loss_name} groups identical texts: it needs the texts (fine-tuning only)")
    if use_groups and groups is None:
        raise ValueError(f"{loss_name} needs group ids")
    towers = Towers(kind, q.shape[1]).to(device)
    opt = torch.optim.AdamW(towers.parameters(), lr=lr, weight_decay=0.0)
    tq, td = torch.from_numpy(q).to(device), torch.from_numpy(d).to(device)
    doc_of = torch.arange(len(q)) if doc_of is None else torch.from_numpy(doc_of)
    tg = torch.from_numpy(groups).to(device) if use_groups else None
    for _ in range(epochs):
        for idx in batches(rng):
            idx = torch.from_numpy(idx)
            loss = fused_samtone_loss(
                towers.encode(tq[idx.to(device)], "query"),
                towers.encode(td[doc_of[idx].to(device)], "doc"),
                temperature=TEMPERATURE,
                normalize=True,
                group_ids=tg[idx.to(device)] if use_groups else None,
                **cfg,
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    return towers


def finetune_minilm(
    loss_name: str,
    queries: list[str],
    codes: list[str],
    batches: list[np.ndarray],
    *,
    lr: float,
    seed: int,
    device: str,
    max_length: int,
    doc_of: np.ndarray | None = None,
    log_every: int = 0,
) -> Callable[[list[str]], np.ndarray]:
    """Fine-tune all-MiniLM-L6-v2 itself (one encoder for both sides: SDE) through the library's
    sentence-transformers loss, ``SamToNeRankingLoss``, as a user of ``SentenceTransformerTrainer`` would:
    one call of the loss on the tokenised (anchor, positive) columns per batch. A loss with "groups"
    sets ``mask_duplicate_positives``: identical documents in a batch share a group. Pair k is
    (queries[k], codes[doc_of[k]]). Returns encode(texts) -> [n, 384] numpy (L2-normalised)."""
    from samtone_kernels.integrations.sentence_transformers import SamToNeRankingLoss

    from .data import load_minilm, log

    torch.manual_seed(seed)
    model = load_minilm(device, max_length)
    cfg = dict(LOSSES[loss_name])
    groups, dups = cfg.pop("groups", False), cfg.pop("dups", False)
    loss_fn = SamToNeRankingLoss(  # "+groups": identical documents only; "+dups": identical anchors or documents
        model, temperature=TEMPERATURE, mask_duplicates=dups, mask_duplicate_positives=groups, **cfg
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    doc_of = np.arange(len(queries)) if doc_of is None else doc_of
    tokenize = getattr(model, "preprocess", None) or model.tokenize  # newer sentence-transformers name it preprocess
    model.train()
    for step, idx in enumerate(batches):
        features = [tokenize([queries[k] for k in idx]), tokenize([codes[doc_of[k]] for k in idx])]
        features = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in f.items()} for f in features]
        loss = loss_fn(features, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log_every and (step + 1) % log_every == 0:
            log(f"  step {step + 1}/{len(batches)}: loss {loss.item():.4f}")
    model.eval()

    def encode(texts: list[str]) -> np.ndarray:
        return model.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True)

    return encode


def retrieval_metrics(q: np.ndarray, d: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray]:
    """Query i's relevant document is d[i]. Returns the metrics, each query's top-1 cosine distance and
    each query's reciprocal rank within the top 10 (0 beyond), for paired comparisons."""
    qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    dn = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    scores = qn @ dn.T
    positive = np.diag(scores)
    rank = (scores > positive[:, None]).sum(axis=1) + 1  # 1-based rank of the relevant document
    in_top10 = rank <= 10
    metrics = {
        "recall@1": float((rank == 1).mean()),
        "recall@10": float(in_top10.mean()),
        "mrr@10": float(np.where(in_top10, 1.0 / rank, 0.0).mean()),
        "ndcg@10": float(np.where(in_top10, 1.0 / np.log2(rank + 1), 0.0).mean()),
    }
    return metrics, 1.0 - scores.max(axis=1), np.where(in_top10, 1.0 / rank, 0.0)


def alignment_uniformity(q: np.ndarray, d: np.ndarray, sample: int = 2000, seed: int = 0) -> dict:
    """Wang and Isola (2020) on L2-normalised embeddings: alignment E|f(q) - f(d+)|^2 (lower is better
    aligned), and each tower's uniformity log E exp(-2 |f(x) - f(y)|^2) over distinct pairs (lower is
    more uniform)."""
    qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    dn = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    idx = np.random.default_rng(seed).permutation(len(q))[:sample]

    def uniformity(x):
        sq = np.maximum(2.0 - 2.0 * x @ x.T, 0.0)
        off = ~np.eye(len(x), dtype=bool)
        return float(np.log(np.exp(-2.0 * sq[off]).mean()))

    return {
        "alignment": float(((qn - dn) ** 2).sum(1).mean()),
        "uniformity_query": uniformity(qn[idx]),
        "uniformity_doc": uniformity(dn[idx]),
    }
