"""The SamToNe loss family and its analytic gradients, in float64 NumPy.

Notation (shapes in brackets):

* ``q`` [N, D] queries, ``d`` [N, D] their positive documents, ``n`` [N, H, D] hard negatives,
  ``n[i, h]`` mined for query ``i``.
* Document columns ``C`` [M, D], M = N (1 + H): block k = 0..H of N columns each; column (j, k) is
  ``d[j]`` for k = 0 and ``n[j, k - 1]`` for k >= 1, stored at row ``k * N + j`` of ``C``.
* Logits ``s(x, y) = x . y / tau``; with ``normalize=True`` every embedding is first replaced by
  ``x / max(|x|, 1e-12)``.
* Four blocks of logits, each with a keep-mask:

  ====  ==========  =========  =====================================================================
  name  anchors     candidates entries removed for anchor i (``g`` = group ids, j != i)
  ====  ==========  =========  =====================================================================
  q2d   q [N]       C [M]      column (j, 0) when g_j == g_i
  q2q   q [N]       q [N]      q_i itself; q_j when g_j == g_i
  d2q   d [N]       q [N]      q_j when g_j == g_i
  d2d   d [N]       C [M]      every column (i, k) of pair i; column (j, 0) when g_j == g_i
  ====  ==========  =========  =====================================================================

* ``Zq_i`` sums ``exp`` over the kept q2d (+ q2q) entries of row i, ``Zd_i`` over the kept d2q
  and d2d entries (when either is selected; "d2d" without "d2q" only with the joint partition), and
  ``pos_i = s(q_i, d_i)``.

  - ``partition="per_anchor"``: ``l_i = [(log Zq_i - pos_i) + w (log Zd_i - pos_i)] / (1 + w)``
    with the doc group, else ``log Zq_i - pos_i``.
  - ``partition="joint"``: ``l_i = log(Zq_i + Zd_i) - pos_i``.

* Hardness weighting (sentence-transformers' ``hardness_mode``, Lan et al. 2025): inside the q2d
  softmax only, a negative entry's logit becomes ``s + alpha * stop_grad(x . y)`` (the raw similarity,
  cosine with ``normalize=True``, not divided by tau), for the entries the mode selects:
  "in_batch_negatives" every column of the other pairs, "hard_negatives" the query's own hard
  negatives, "all_negatives" every column but the query's own positive. The positive logit is
  never changed; the stop-gradient changes the softmax weights, not the gradient path.
* False-negative margin (``false_negative_margin=m``, default None: off): in every block, an entry
  whose raw similarity to the anchor (``x . y``, cosine with ``normalize=True``, not divided by tau)
  exceeds the pair's positive similarity ``q_i . d_i`` plus m is removed from the anchor's softmax
  (a presumed false negative), except the anchor's own positive (column (i, 0) of q2d, q_i in d2q).
  For a document anchor the positive similarity is the same ``q_i . d_i``. A mask: no gradient
  flows through the comparison.
* Hard-negative scope (``hard_negative_scope``): "shared" (default, sentence-transformers' layout)
  as in the table above, every anchor sees every pair's hard negatives; "own": the columns (j, k >= 1)
  of q2d are kept for row j only (query j's own hard negatives), and d2d keeps no hard-negative
  column (the other pairs' hard negatives are nobody's). Written here as masks over the same blocks.
* Matryoshka (``matryoshka_dims=(m_1, ..., m_K)``, strictly increasing, m_K = D; weights w_k,
  default 1): the loss is ``sum_k w_k L(q[:, :m_k], d[:, :m_k], n[..., :m_k])``, each prefix a whole
  loss of its own (normalised on its own with ``normalize=True``, its own margin comparisons), and the
  gradients the weighted sums of the prefixes' gradients, zero beyond each prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALL_DIRECTIONS = ("q2d", "q2q", "d2q", "d2d")
NORM_EPS = 1e-12


# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------
HARDNESS_MODES = (None, "in_batch_negatives", "hard_negatives", "all_negatives")
HARD_NEGATIVE_SCOPES = ("shared", "own")


def _check_options(
    directions,
    partition,
    doc_anchor_weight,
    reduction,
    temperature,
    hardness_mode=None,
    hardness_strength=0.0,
    false_negative_margin=None,
    hard_negative_scope="shared",
):
    directions = tuple(directions)
    unknown = set(directions) - set(ALL_DIRECTIONS)
    if unknown:
        raise ValueError(f"directions: unknown {sorted(unknown)}, expected a subset of {ALL_DIRECTIONS}")
    if "q2d" not in directions:
        raise ValueError("directions: 'q2d' is required (it holds the positive pair)")
    if partition not in ("per_anchor", "joint"):
        raise ValueError(f"partition: expected 'per_anchor' or 'joint', got {partition!r}")
    if "d2d" in directions and "d2q" not in directions and partition != "joint":
        raise ValueError("directions: 'd2d' without 'd2q' needs partition='joint'")
    if hardness_mode not in HARDNESS_MODES:
        raise ValueError(f"hardness_mode: expected one of {HARDNESS_MODES}")
    if not (np.isfinite(hardness_strength) and hardness_strength >= 0):
        raise ValueError("hardness_strength: expected a finite value >= 0")
    if doc_anchor_weight < 0:
        raise ValueError("doc_anchor_weight: expected >= 0")
    if partition == "joint" and doc_anchor_weight != 1.0:
        raise ValueError("doc_anchor_weight: must be 1.0 with partition='joint'")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError("temperature: expected a finite value > 0")
    if false_negative_margin is not None and not np.isfinite(false_negative_margin):
        raise ValueError("false_negative_margin: expected a finite value or None")
    if hard_negative_scope not in HARD_NEGATIVE_SCOPES:
        raise ValueError(f"hard_negative_scope: expected one of {HARD_NEGATIVE_SCOPES}, got {hard_negative_scope!r}")
    return set(directions)


# --------------------------------------------------------------------------------------------------
# Normalisation and its gradient
# --------------------------------------------------------------------------------------------------
def _normalize(x: np.ndarray) -> np.ndarray:
    norm = np.sqrt((x * x).sum(-1, keepdims=True))
    return x / np.maximum(norm, NORM_EPS)


def _normalize_backward(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Gradient through ``y = x / max(|x|, eps)`` given ``g = dL/dy``.

    For |x| > eps: dy/dx = (I - y y^T) / |x|, so dL/dx = (g - y (y . g)) / |x|.
    For |x| <= eps the denominator is the constant eps:   dL/dx = g / eps.
    """
    norm = np.sqrt((x * x).sum(-1, keepdims=True))
    y = x / np.maximum(norm, NORM_EPS)
    projected = (g - y * (y * g).sum(-1, keepdims=True)) / np.maximum(norm, NORM_EPS)
    return np.where(norm > NORM_EPS, projected, g / NORM_EPS)


# --------------------------------------------------------------------------------------------------
# Logit blocks
# --------------------------------------------------------------------------------------------------
@dataclass
class Blocks:
    """The four logit blocks of a batch and their keep-masks (True = the entry is in the sums).

    Every block is built whatever the directions; the partition picks the ones it uses.
    """

    q: np.ndarray  # [N, D] (normalised if asked)
    d: np.ndarray  # [N, D]
    columns: np.ndarray  # [M, D], M = N (1 + H)
    temperature: float
    s_qd: np.ndarray  # [N, M]
    s_qq: np.ndarray  # [N, N]
    s_dq: np.ndarray  # [N, N]
    s_dd: np.ndarray  # [N, M]
    keep_qd: np.ndarray
    keep_qq: np.ndarray
    keep_dq: np.ndarray
    keep_dd: np.ndarray

    @property
    def pos(self) -> np.ndarray:
        """[N] positive logits s(q_i, d_i): the diagonal of the first q2d block."""
        n = self.q.shape[0]
        return self.s_qd[np.arange(n), np.arange(n)]


def hardness_mask(n_pairs: int, n_blocks: int, mode) -> np.ndarray:
    """[N, M] True where the q2d logit gets the hardness penalty (see the module docstring)."""
    own = np.tile(np.eye(n_pairs, dtype=bool), (1, n_blocks))  # the columns (i, k) of pair i
    block = np.repeat(np.arange(n_blocks), n_pairs)[None, :]  # the block k of each column
    if mode == "in_batch_negatives":
        return ~own
    if mode == "hard_negatives":
        return own & (block >= 1)
    if mode == "all_negatives":
        return ~(own & (block == 0))
    return np.zeros((n_pairs, n_pairs * n_blocks), dtype=bool)


def build_blocks(
    q,
    d,
    hard_negatives=None,
    *,
    temperature=0.05,
    group_ids=None,
    normalize=False,
    false_negative_margin=None,
    hard_negative_scope="shared",
) -> Blocks:
    """Build the logit blocks and keep-masks (see the module docstring for the rules)."""
    q = np.asarray(q, dtype=np.float64)
    d = np.asarray(d, dtype=np.float64)
    n_pairs, dim = q.shape
    negs = np.zeros((n_pairs, 0, dim)) if hard_negatives is None else np.asarray(hard_negatives, dtype=np.float64)
    if normalize:
        q, d, negs = _normalize(q), _normalize(d), _normalize(negs)
    n_blocks = 1 + negs.shape[1]
    # Column (j, k) at row k * N + j: block 0 the positives, block k the k-th hard negative of each pair.
    columns = np.concatenate([d] + [negs[:, k] for k in range(negs.shape[1])], axis=0)
    tau = float(temperature)

    i = np.arange(n_pairs)[:, None]
    j = np.arange(n_pairs)[None, :]
    if group_ids is None:
        same_group = i == j
    else:
        g = np.asarray(group_ids)
        same_group = g[:, None] == g[None, :]
    other_in_group = same_group & (i != j)  # relevant to each other: never negatives
    own_pair = np.tile(i == j, (1, n_blocks))  # [N, M]: the columns (i, k) of pair i
    hard_cols = np.zeros((n_pairs, n_pairs * (n_blocks - 1)), dtype=bool)
    group_cols = np.concatenate([other_in_group, hard_cols], axis=1)  # groups touch block 0 only

    raw = {"qd": q @ columns.T, "qq": q @ q.T, "dq": d @ q.T, "dd": d @ columns.T}  # x . y
    keep = {
        "qd": ~group_cols,
        "qq": ~same_group,  # removes q_i itself and its group
        "dq": ~other_in_group,  # keeps the positive q_i
        "dd": ~(own_pair | group_cols),
    }
    if hard_negative_scope == "own":
        # Column (j, k >= 1) is query j's alone: no other query's, no document's.
        is_hard = np.concatenate([np.zeros((n_pairs, n_pairs), dtype=bool), ~hard_cols], axis=1)
        keep["qd"] = keep["qd"] & ~(is_hard & ~own_pair)
        keep["dd"] = keep["dd"] & ~is_hard
    if false_negative_margin is not None:
        # Presumed false negatives: more similar to the anchor than its positive, by more than m.
        positive = (q * d).sum(-1)[:, None] + float(false_negative_margin)
        is_positive = {"qd": np.concatenate([i == j, hard_cols], axis=1), "dq": i == j}
        for name in keep:
            presumed = raw[name] > positive
            if name in is_positive:
                presumed &= ~is_positive[name]  # the anchor's own positive is never dropped
            keep[name] = keep[name] & ~presumed

    return Blocks(
        q=q,
        d=d,
        columns=columns,
        temperature=tau,
        s_qd=raw["qd"] / tau,
        s_qq=raw["qq"] / tau,
        s_dq=raw["dq"] / tau,
        s_dd=raw["dd"] / tau,
        keep_qd=keep["qd"],
        keep_qq=keep["qq"],
        keep_dq=keep["dq"],
        keep_dd=keep["dd"],
    )


def _masked_logsumexp(blocks: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Row-wise log(sum over kept entries of exp(s)) across several (logits, keep) blocks."""
    s = np.concatenate([np.where(keep, s, -np.inf) for s, keep in blocks], axis=1)
    m = s.max(axis=1, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return (m_safe + np.log(np.exp(s - m_safe).sum(axis=1, keepdims=True)))[:, 0]


# --------------------------------------------------------------------------------------------------
# Loss and gradients
# --------------------------------------------------------------------------------------------------
def _anchor_terms(b: Blocks, dirs: set, partition: str, w: float, hardness_mode=None, hardness_strength=0.0):
    """Per-row log-partitions and the coefficient of each block in dl_i/ds.

    Returns (row_losses [N], {block: (softmax logits, keep, lse [N], coef)}) where
    dl_i / ds_x = coef * exp(s'_x - lse_i) for each kept entry x of row i's block (s' = s plus the
    hardness penalty, a constant), and dl_i / dpos_i = -1 in every configuration.
    """
    s_qd = b.s_qd
    if hardness_mode is not None and hardness_strength > 0:
        # s' = s + alpha * stop_grad(x . y), with x . y = s * tau the raw similarity.
        n_blocks = b.columns.shape[0] // b.q.shape[0]
        s_qd = s_qd + hardness_strength * (s_qd * b.temperature) * hardness_mask(b.q.shape[0], n_blocks, hardness_mode)
    q_blocks = {"qd": (s_qd, b.keep_qd)}
    if "q2q" in dirs:
        q_blocks["qq"] = (b.s_qq, b.keep_qq)
    d_blocks = {}
    if "d2q" in dirs:
        d_blocks["dq"] = (b.s_dq, b.keep_dq)
    if "d2d" in dirs:
        d_blocks["dd"] = (b.s_dd, b.keep_dd)

    terms = {}
    if partition == "joint":
        # l_i = log(Zq_i + Zd_i) - pos_i: one softmax over every kept entry of both anchors.
        lse = _masked_logsumexp(list(q_blocks.values()) + list(d_blocks.values()))
        for name, (s, keep) in {**q_blocks, **d_blocks}.items():
            terms[name] = (s, keep, lse, 1.0)
        return lse - b.pos, terms

    # per_anchor: l_i = [(Lq_i - pos_i) + w (Ld_i - pos_i)] / (1 + w); dl/dpos = -(1 + w)/(1 + w) = -1.
    lse_q = _masked_logsumexp(list(q_blocks.values()))
    if not d_blocks:
        for name, (s, keep) in q_blocks.items():
            terms[name] = (s, keep, lse_q, 1.0)
        return lse_q - b.pos, terms
    lse_d = _masked_logsumexp(list(d_blocks.values()))
    for name, (s, keep) in q_blocks.items():
        terms[name] = (s, keep, lse_q, 1.0 / (1.0 + w))
    for name, (s, keep) in d_blocks.items():
        terms[name] = (s, keep, lse_d, w / (1.0 + w))
    return ((lse_q - b.pos) + w * (lse_d - b.pos)) / (1.0 + w), terms


def check_matryoshka(dims, weights, dim: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(dims, weights) of a Matryoshka loss over embeddings of dimension ``dim``."""
    dims = tuple(int(m) for m in dims)
    if not dims or any(m < 1 for m in dims) or any(b <= a for a, b in zip(dims, dims[1:])) or dims[-1] != dim:
        raise ValueError(f"matryoshka_dims: expected strictly increasing dims >= 1 ending at D = {dim}, got {dims}")
    weights = (1.0,) * len(dims) if weights is None else tuple(float(w) for w in weights)
    if len(weights) != len(dims) or not all(np.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"matryoshka_weights: expected {len(dims)} finite values >= 0, got {weights}")
    return dims, weights


def matryoshka_loss(q, d, hard_negatives=None, *, matryoshka_dims, matryoshka_weights=None, **options):
    """``samtone_loss`` summed over the prefixes, weighted (see the module docstring)."""
    dims, weights = check_matryoshka(matryoshka_dims, matryoshka_weights, np.shape(q)[1])
    n = None if hard_negatives is None else np.asarray(hard_negatives)
    total = 0.0
    for m, w in zip(dims, weights):
        prefix = None if n is None else n[..., :m]
        total = total + w * samtone_loss(np.asarray(q)[:, :m], np.asarray(d)[:, :m], prefix, **options)
    return total


def matryoshka_grad(q, d, hard_negatives=None, *, matryoshka_dims, matryoshka_weights=None, **options):
    """``samtone_grad`` summed over the prefixes, weighted: each prefix's gradient lies in its first
    m_k columns (the loss of prefix k does not depend on the others)."""
    q, d = np.asarray(q, dtype=np.float64), np.asarray(d, dtype=np.float64)
    dims, weights = check_matryoshka(matryoshka_dims, matryoshka_weights, q.shape[1])
    n = None if hard_negatives is None else np.asarray(hard_negatives, dtype=np.float64)
    out = {"queries": np.zeros_like(q), "docs": np.zeros_like(d), "temperature": 0.0}
    if n is not None:
        out["hard_negatives"] = np.zeros_like(n)
    for m, w in zip(dims, weights):
        g = samtone_grad(q[:, :m], d[:, :m], None if n is None else n[..., :m], **options)
        out["queries"][:, :m] += w * g["queries"]
        out["docs"][:, :m] += w * g["docs"]
        out["temperature"] += w * g["temperature"]
        if n is not None:
            out["hard_negatives"][..., :m] += w * g["hard_negatives"]
    return out


def samtone_loss(
    q,
    d,
    hard_negatives=None,
    *,
    temperature=0.05,
    directions=("q2d", "q2q"),
    partition="per_anchor",
    doc_anchor_weight=1.0,
    group_ids=None,
    normalize=False,
    reduction="mean",
    hardness_mode=None,
    hardness_strength=0.0,
    false_negative_margin=None,
    hard_negative_scope="shared",
):
    """The loss, as a float (or an [N] array for ``reduction="none"``).

    Parameters are those of ``samtone_kernels.fused_samtone_loss`` without ``backend``; arrays are
    NumPy (any float dtype, computed in float64).
    """
    dirs = _check_options(
        directions,
        partition,
        doc_anchor_weight,
        reduction,
        temperature,
        hardness_mode,
        hardness_strength,
        false_negative_margin,
        hard_negative_scope,
    )
    b = build_blocks(
        q,
        d,
        hard_negatives,
        temperature=temperature,
        group_ids=group_ids,
        normalize=normalize,
        false_negative_margin=false_negative_margin,
        hard_negative_scope=hard_negative_scope,
    )
    losses, _ = _anchor_terms(b, dirs, partition, float(doc_anchor_weight), hardness_mode, hardness_strength)
    if reduction == "none":
        return losses
    return float(losses.mean() if reduction == "mean" else losses.sum())


def samtone_grad(
    q,
    d,
    hard_negatives=None,
    *,
    temperature=0.05,
    directions=("q2d", "q2q"),
    partition="per_anchor",
    doc_anchor_weight=1.0,
    group_ids=None,
    normalize=False,
    reduction="mean",
    hardness_mode=None,
    hardness_strength=0.0,
    false_negative_margin=None,
    hard_negative_scope="shared",
):
    """Analytic gradients of the reduced loss (of its sum for ``reduction="none"``).

    Returns a dict with "queries" [N, D], "docs" [N, D], "hard_negatives" [N, H, D] (when given) and
    "temperature" (float).

    Derivation. Let L = sum_i c_i l_i, with c_i = 1/N ("mean") or 1 ("sum", "none"). For an entry x
    of block X in row i, dL/ds_x = G_X[i, x] = c_i * coef_X * exp(s_x - lse_i) (zero where masked;
    see ``_anchor_terms``), and dL/dpos_i = -c_i. Each logit is s = a . b / tau, so

        dL/da += G b / tau,   dL/db += G a / tau,   dL/dtau = -sum(G * s) / tau,

    summed over every block an embedding takes part in, on either side:

        dq = (G_qd C + G_qq q + G_qq^T q + G_dq^T d - c * d) / tau   (q anchors q2q *and* is its candidate)
        dC = (G_qd^T q + G_dd^T d) / tau                              (columns: positives and negatives)
        dd = dC[block 0] + (G_dd C + G_dq q - c * q) / tau
        dtau = -(sum_X sum(G_X * S_X) - sum_i c_i pos_i) / tau

    and, with ``normalize=True``, the chain rule through x / max(|x|, eps) (``_normalize_backward``).
    The hardness penalty is a constant (stop-gradient): it enters G through the softmax weights
    only, and dtau sums G against the logits s without it. The false-negative margin is a mask: it
    enters through ``keep`` alone (the comparison is piecewise constant), and so does the scope of
    the hard negatives.
    """
    dirs = _check_options(
        directions,
        partition,
        doc_anchor_weight,
        reduction,
        temperature,
        hardness_mode,
        hardness_strength,
        false_negative_margin,
        hard_negative_scope,
    )
    q_raw = np.asarray(q, dtype=np.float64)
    d_raw = np.asarray(d, dtype=np.float64)
    b = build_blocks(
        q_raw,
        d_raw,
        hard_negatives,
        temperature=temperature,
        group_ids=group_ids,
        normalize=normalize,
        false_negative_margin=false_negative_margin,
        hard_negative_scope=hard_negative_scope,
    )
    _, terms = _anchor_terms(b, dirs, partition, float(doc_anchor_weight), hardness_mode, hardness_strength)
    logits = {"qd": b.s_qd, "qq": b.s_qq, "dq": b.s_dq, "dd": b.s_dd}  # without the penalty
    n_pairs, dim = b.q.shape
    tau = b.temperature
    c = np.full(n_pairs, 1.0 / n_pairs if reduction == "mean" else 1.0)

    zeros_nn, zeros_nm = np.zeros((n_pairs, n_pairs)), np.zeros((n_pairs, b.columns.shape[0]))
    grads = {"qd": zeros_nm, "qq": zeros_nn, "dq": zeros_nn, "dd": zeros_nm}
    dtau_logits = 0.0
    for name, (s, keep, lse, coef) in terms.items():
        # G = c_i * coef * softmax entry, zero where masked (exp of a kept entry minus its row's LSE).
        g = c[:, None] * coef * np.exp(np.where(keep, s - lse[:, None], -np.inf))
        grads[name] = g
        dtau_logits += (g * np.where(keep, logits[name], 0.0)).sum()

    g_qd, g_qq, g_dq, g_dd = grads["qd"], grads["qq"], grads["dq"], grads["dd"]
    cols, qh, dh = b.columns, b.q, b.d
    dq = (g_qd @ cols + g_qq @ qh + g_qq.T @ qh + g_dq.T @ dh - c[:, None] * dh) / tau
    dcols = (g_qd.T @ qh + g_dd.T @ dh) / tau
    dd = dcols[:n_pairs] + (g_dd @ cols + g_dq @ qh - c[:, None] * qh) / tau
    n_hard = cols.shape[0] // n_pairs - 1
    dn = dcols[n_pairs:].reshape(n_hard, n_pairs, dim).transpose(1, 0, 2)
    dtau = -(dtau_logits - (c * b.pos).sum()) / tau

    if normalize:
        dq = _normalize_backward(q_raw, dq)
        dd = _normalize_backward(d_raw, dd)
        if hard_negatives is not None:
            dn = _normalize_backward(np.asarray(hard_negatives, dtype=np.float64), dn)

    out = {"queries": dq, "docs": dd, "temperature": float(dtau)}
    if hard_negatives is not None:
        out["hard_negatives"] = dn
    return out
