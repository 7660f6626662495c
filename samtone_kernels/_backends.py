"""The backends behind ``fused_samtone_loss``: one registry over the contract of ``_contract``.

``fused_samtone_loss`` keeps validation, gathering, the partition, the non-finite rule and the
reduction, so every backend shares those semantics exactly. A new backend is one ``Backend`` entry
in ``REGISTRY``; ``"auto"`` tries the entries in order. The backend's name is checked here, where it
is resolved (``check_backend_name``), before anything runs.
"""

from __future__ import annotations

import torch

from ._constants import interpreting
from ._contract import Backend, LossOptions, Rows
from ._torch_impl import prepare_torch, row_stats_torch


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is never imported at package import)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _needs_triton(name: str):
    """Why backend ``name`` (its Triton kernels) cannot run on embeddings like ``x``, or None."""

    def unavailable(x: torch.Tensor) -> Exception | None:
        if not triton_available():
            return ValueError(f"backend={name!r}: the triton package is not installed (pip install triton)")
        if x.dtype == torch.float64:
            return TypeError(f"backend={name!r}: float64 inputs are not supported by the kernels; use backend='torch'")
        if x.device.type == "cpu" and not interpreting():
            return ValueError(
                f"backend={name!r} on CPU tensors runs only under the Triton interpreter "
                "(set TRITON_INTERPRET=1 before importing triton); use CUDA tensors or backend='torch'"
            )
        if x.device.type not in ("cpu", "cuda"):
            return ValueError(f"backend={name!r}: unsupported device {x.device}; use backend='torch'")
        return None

    return unavailable


_triton_unavailable = _needs_triton("triton")


def _prepare_triton(embeddings: list[torch.Tensor], options: LossOptions) -> list[torch.Tensor]:
    from ._triton import prepare_triton  # triton is imported only when its backend runs

    return prepare_triton(embeddings, options)


def _row_stats_triton(rows: Rows, options: LossOptions) -> tuple[torch.Tensor, torch.Tensor]:
    from ._triton import row_stats_triton

    return row_stats_triton(rows, options)


def _prepare_hybrid(embeddings: list[torch.Tensor], options: LossOptions) -> list[torch.Tensor]:
    from ._triton.hybrid import prepare_hybrid

    return prepare_hybrid(embeddings, options)


def _row_stats_hybrid(rows: Rows, options: LossOptions) -> tuple[torch.Tensor, torch.Tensor]:
    from ._triton.hybrid import row_stats_hybrid

    return row_stats_hybrid(rows, options)


REGISTRY: dict[str, Backend] = {
    # The fused kernels: CUDA (or the interpreter, by name only), 16- and 32-bit floats.
    "triton": Backend(
        _prepare_triton,
        _row_stats_triton,
        _triton_unavailable,
        lambda x: x.device.type == "cuda" and _triton_unavailable(x) is None,
    ),
    # GEMMs by torch (cuBLAS) into float32 logit chunks, Triton epilogues for every elementwise step.
    # "auto" reaches it only by measurement on a GPU (``_choice``), never by this order.
    "hybrid": Backend(_prepare_hybrid, _row_stats_hybrid, _needs_triton("hybrid"), lambda x: False, prefixes=True),
    # Eager torch: every device and dtype; row chunks keep its logits within a memory budget.
    "torch": Backend(prepare_torch, row_stats_torch, lambda x: None, lambda x: True, prefixes=True),
}


def check_backend_name(name: str) -> str:
    """``name`` if it is "auto" or a ``REGISTRY`` key, else a ``ValueError`` naming the choices."""
    if name != "auto" and name not in REGISTRY:
        raise ValueError(f"backend: expected one of {('auto', *REGISTRY)}, got {name!r}")
    return name


def check_backend_here(name: str) -> str:
    """``check_backend_name``, and for a loss constructed with a Triton backend, that this machine can
    ever run it (triton installed; a CUDA GPU, or the interpreter): said when the loss is built, not
    at its first step. Which device the embeddings will be on is checked when they arrive."""
    check_backend_name(name)
    if name in ("triton", "hybrid"):
        if not triton_available():
            raise ValueError(f"backend={name!r}: the triton package is not installed (pip install triton)")
        if not torch.cuda.is_available() and not interpreting():
            raise ValueError(
                f"backend={name!r} needs a CUDA GPU and this machine has none (the Triton interpreter, "
                "TRITON_INTERPRET=1, runs it on CPU for testing); use backend='auto' or 'torch'"
            )
    return name


def resolve_backend(name: str, x: torch.Tensor) -> Backend:
    """The backend ``name`` ("auto" or a ``REGISTRY`` key) runs for embeddings like ``x``; an unknown
    name, or a backend asked for by name that cannot run, raises its reason."""
    if check_backend_name(name) == "auto":
        return next(backend for backend in REGISTRY.values() if backend.auto(x))
    backend = REGISTRY[name]
    reason = backend.unavailable(x)
    if reason is not None:
        raise reason
    return backend
