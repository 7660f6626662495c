"""The contract between ``fused_samtone_loss`` and its backends: the validated options, the rows a
backend scores, and the four functions a backend provides. Below every backend: it imports only
the table (``_plan``), so the backends, the validation and the registry can all depend on it.

A backend (``Backend``) is two functions and two checks:

- ``prepare(embeddings, options) -> embeddings``: whatever the backend needs done to the local
  ``[queries, docs(, hard_negatives)]`` before they are gathered across devices (upcasting,
  normalisation, copies);
- ``row_stats(rows, options) -> (lse [A, n], pos [n])``: the per-anchor log-partitions (row 0 the
  query anchors', row 1, with document anchors, the documents') and the positive logits
  ``scale * q_i . d_i``, differentiable;
- ``unavailable(x)``: why it cannot run on embeddings like ``x`` (an exception to raise when the
  user asked for it by name), or None;
- ``auto(x)``: whether ``backend="auto"`` picks it for ``x``;
- ``prefixes``: whether ``row_stats`` computes every Matryoshka prefix in one pass (given
  ``options.matryoshka_dims`` and raw, unnormalised rows: lse [K, A, n], pos [K, n]); a backend
  without it is called once per prefix, on the truncated embeddings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import _plan


@dataclass(frozen=True)
class LossOptions:
    """Validated options of ``fused_samtone_loss`` (everything but the tensors and the backend)."""

    directions: tuple[str, ...]
    partition: str
    doc_anchor_weight: float
    normalize: bool
    reduction: str
    hardness_mode: str | None = None
    hardness_strength: float = 0.0
    gather_across_devices: bool = False
    chunk_bytes: int | None = None  # the budget of one chunk of materialised logits (None: the backend's)
    false_negative_margin: float | None = None  # drop candidates more similar than the positive plus it
    hard_negative_scope: str = "shared"  # "own": pair i's hard negatives are query i's candidates only
    matryoshka_dims: tuple[int, ...] | None = None  # the prefixes' dims, the last = D (None: off)
    matryoshka_weights: tuple[float, ...] | None = None  # one per prefix (with the dims)

    @property
    def doc_anchor(self) -> bool:
        """True when some selected block has document anchors (d2q, d2d): there is a log Zd row."""
        return any(block.anchor == "d" for block in _plan.selected(self.directions))

    @property
    def hardness(self) -> float:
        """The hardness penalty's strength alpha (0 when no mode is set)."""
        return self.hardness_strength if self.hardness_mode is not None else 0.0


@dataclass(frozen=True)
class Rows:
    """The inputs of ``row_stats``, prepared (and gathered).

    q, d : [n, D] the anchors, this process's pairs.
    q_all, d_all : [N, D] the candidate queries and positives (the same tensors as ``q``, ``d`` unless
        the batch was gathered across devices); anchor i is pair ``offset + i`` among them.
    n_all : [N, H, D] the candidate hard negatives, or None.
    scale : 1 / temperature, a float or a 0-dim tensor (which may require grad).
    group_ids : [N] int64 global group ids, or None.
    """

    q: torch.Tensor
    d: torch.Tensor
    q_all: torch.Tensor
    d_all: torch.Tensor
    n_all: torch.Tensor | None
    scale: float | torch.Tensor
    group_ids: torch.Tensor | None = None
    offset: int = 0

    @property
    def shared(self) -> bool:
        """The candidates are the anchors themselves (one process, the whole batch)."""
        return self.q_all is self.q and self.d_all is self.d and self.offset == 0


class Backend(NamedTuple):
    prepare: Callable[[list[torch.Tensor], LossOptions], list[torch.Tensor]]
    row_stats: Callable[[Rows, LossOptions], tuple[torch.Tensor, torch.Tensor]]
    unavailable: Callable[[torch.Tensor], Exception | None]
    auto: Callable[[torch.Tensor], bool]
    prefixes: bool = False
