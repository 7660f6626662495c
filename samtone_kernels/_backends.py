"""The backends behind ``fused_samtone_loss``: one contract, one registry.

A backend is two functions and two checks (``Backend``):

- ``prepare(embeddings, options) -> embeddings``: whatever the backend needs done to the local
  ``[queries, docs(, hard_negatives)]`` before they are gathered across devices (upcasting,
  normalisation, copies);
- ``row_stats(rows, options) -> (lse [A, n], pos [n])``: the per-anchor log-partitions (row 0 the
  query anchors', row 1, with document anchors, the documents') and the positive logits
  ``scale * q_i . d_i``, differentiable;
- ``unavailable(x)``: why it cannot run on embeddings like ``x`` (an exception to raise when the
  user asked for it by name), or None;
- ``auto(x)``: whether ``backend="auto"`` picks it for ``x``.

``fused_samtone_loss`` keeps validation, gathering, the partition, the non-finite rule and the
reduction, so every backend shares those semantics exactly. A new backend is one ``Backend`` entry
in ``REGISTRY``; ``"auto"`` tries the entries in order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._options import LossOptions, interpreting
from ._torch_impl import prepare_torch, row_stats_torch


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


class Backend(NamedTuple):
    prepare: Callable[[list[torch.Tensor], LossOptions], list[torch.Tensor]]
    row_stats: Callable[[Rows, LossOptions], tuple[torch.Tensor, torch.Tensor]]
    unavailable: Callable[[torch.Tensor], Exception | None]
    auto: Callable[[torch.Tensor], bool]


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is never imported at package import)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_unavailable(x: torch.Tensor) -> Exception | None:
    if not triton_available():
        return ValueError("backend='triton': the triton package is not installed (pip install triton)")
    if x.dtype == torch.float64:
        return TypeError("backend='triton': float64 inputs are not supported by the kernel; use backend='torch'")
    if x.device.type == "cpu" and not interpreting():
        return ValueError(
            "backend='triton' on CPU tensors runs only under the Triton interpreter "
            "(set TRITON_INTERPRET=1 before importing triton); use CUDA tensors or backend='torch'"
        )
    if x.device.type not in ("cpu", "cuda"):
        return ValueError(f"backend='triton': unsupported device {x.device}; use backend='torch'")
    return None


def _prepare_triton(embeddings: list[torch.Tensor], options: LossOptions) -> list[torch.Tensor]:
    from ._triton import prepare_triton  # triton is imported only when its backend runs

    return prepare_triton(embeddings, options)


def _row_stats_triton(rows: Rows, options: LossOptions) -> tuple[torch.Tensor, torch.Tensor]:
    from ._triton import row_stats_triton

    return row_stats_triton(rows, options)


REGISTRY: dict[str, Backend] = {
    # The fused kernels: CUDA (or the interpreter, by name only), 16- and 32-bit floats.
    "triton": Backend(_prepare_triton, _row_stats_triton, _triton_unavailable,
                      lambda x: x.device.type == "cuda" and _triton_unavailable(x) is None),
    # Eager torch: every device and dtype; row chunks keep its logits within a memory budget.
    "torch": Backend(prepare_torch, row_stats_torch, lambda x: None, lambda x: True),
}


def resolve_backend(name: str, x: torch.Tensor) -> Backend:
    """The backend ``name`` ("auto" or a ``REGISTRY`` key, validated by ``check_options``) runs for
    embeddings like ``x``; a backend asked for by name that cannot run raises its reason."""
    if name == "auto":
        return next(backend for backend in REGISTRY.values() if backend.auto(x))
    backend = REGISTRY[name]
    reason = backend.unavailable(x)
    if reason is not None:
        raise reason
    return backend
