"""``backend="auto"`` on a GPU: the path chosen by measurement on the user's device.

Neither GPU path wins everywhere (the fused kernel moves fewer bytes, the hybrid path runs its GEMMs
in cuBLAS), and which wins depends on the GPU, D, N and the options. So, as cuDNN's benchmark mode
does, the first call of each *key* (device, dtype, D, N rounded up to a power of two, H, the direction
set and the option flags, gathered or not) runs every eligible path forward and backward on detached
copies of its inputs, times them, **checks that they agree** (loss and every gradient within the
dtype's tolerance of each other), and caches the fastest for the key. A disagreement warns once,
naming the key and how to reproduce it, and the key falls back to the hybrid path. Eligible: a path
that can run on the inputs and whose estimated peak memory fits what the device has free.

The measurement leaves training alone: it builds no graph on the live inputs (it works on detached
copies), draws no random numbers and changes no input. ``SAMTONE_BACKEND`` pins the path ``"auto"``
takes; ``backend_choices()`` returns what was chosen, and ``bench/speed.py`` prints it.
"""

from __future__ import annotations

import math
import os
import statistics
import warnings
from collections.abc import Callable

import torch

from . import _plan
from ._backends import REGISTRY
from ._contract import LossOptions

#: The paths measured, in the order a tie goes to.
CANDIDATES = ("triton", "hybrid")
#: Where a disagreement falls back to: GEMMs by cuBLAS and elementwise kernels, the simplest GPU path.
FALLBACK = "hybrid"
#: Relative agreement asked of two paths, per input dtype (of the loss and of each gradient's max).
AGREEMENT = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}
WARMUP, REPEATS = 1, 3

_choices: dict[tuple, str] = {}
_warned: set[tuple] = set()


def backend_choices() -> dict[tuple, str]:
    """The paths ``backend="auto"`` chose so far, by key: (device, dtype, D, N bucket, H, directions,
    partition, normalize, hardness mode, group ids given, margin on, gathered)."""
    return dict(_choices)


def clear_choices() -> None:
    """Forget every choice (the next call of each key measures again)."""
    _choices.clear()
    _warned.clear()


def key(queries: torch.Tensor, hard_negatives: torch.Tensor | None, group_ids, options: LossOptions) -> tuple:
    n = queries.shape[0]
    return (
        str(queries.device),
        str(queries.dtype).replace("torch.", ""),
        queries.shape[1],
        1 << max(0, math.ceil(math.log2(n))),
        0 if hard_negatives is None else hard_negatives.shape[1],
        _plan.encode_directions(options.directions),
        options.partition,
        options.normalize,
        options.hardness_mode,
        group_ids is not None,
        options.false_negative_margin is not None,
        options.gather_across_devices,
        options.hard_negative_scope,
        options.matryoshka_dims,
    )


def cuda_timer(name: str, run: Callable[[], object]) -> float:
    """Milliseconds of ``run()`` (path ``name``) on the current CUDA stream: CUDA events, the median
    of REPEATS runs after WARMUP (which compiles and autotunes)."""
    for _ in range(WARMUP):
        run()
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


#: The clock the measurement uses (tests inject their own).
TIMER: Callable[[str, Callable[[], object]], float] = cuda_timer
#: Measure on CPU tensors too (the tests, under the Triton interpreter); otherwise CPU keeps "torch".
MEASURE_ON_CPU = False


def measured_paths(x: torch.Tensor) -> list[str]:
    """The paths chosen between by measurement for embeddings like ``x``: the GPU paths that can run;
    none off CUDA (unless ``MEASURE_ON_CPU``), where "auto" is the torch backend."""
    if x.device.type != "cuda" and not MEASURE_ON_CPU:
        return []
    return [name for name in CANDIDATES if REGISTRY[name].unavailable(x) is None]


def free_bytes(device: torch.device) -> int | None:
    """Bytes the device has free, or None where that is not known (every path is then eligible)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return None


def peak_bytes(name: str, n: int, m: int, dim: int, itemsize: int, chunk_bytes: int | None) -> int:
    """An upper estimate of a path's memory beyond its inputs, for N anchors against M columns: the
    fused kernel's gradients and one float32 buffer; the hybrid path's chunk of float32 logits and
    coefficients, and float32 gradient accumulators."""
    embeddings = (2 * n + m) * dim
    if name == "triton":
        return embeddings * (itemsize + 4)
    chunk = min(chunk_bytes or (1 << 30), n * m * (4 + itemsize))
    return chunk + embeddings * (4 + itemsize)


def _run(loss_fn: Callable, name: str, inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss and gradients of ``loss_fn(*copies, backend=name)`` on detached copies of ``inputs``."""
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
    loss = loss_fn(*leaves, backend=name)
    grads = torch.autograd.grad(loss.float().sum(), [x for x in leaves if x is not None])
    return loss.detach(), list(grads)


def _agree(a, b, dtype: torch.dtype) -> bool:
    rtol = AGREEMENT.get(dtype, 1e-3)
    for x, y in zip([a[0], *a[1]], [b[0], *b[1]]):
        scale = max(float(x.float().abs().max()), float(y.float().abs().max()), 1e-30)
        if not math.isfinite(scale) or float((x.float() - y.float()).abs().max()) > rtol * scale:
            return False
    return True


def choose(paths: list[str], inputs: tuple, group_ids, options: LossOptions, loss_fn: Callable) -> str:
    """The path for this call: pinned (``SAMTONE_BACKEND``), cached for its key, or measured now.

    ``inputs``: (queries, docs, hard_negatives or None); ``loss_fn(q, d, n, backend=name)``: the
    loss with this call's options, computed in one process (gathering would make every rank measure
    in lockstep)."""
    pinned = os.environ.get("SAMTONE_BACKEND")
    if pinned:
        if pinned not in REGISTRY:
            raise ValueError(f"SAMTONE_BACKEND: expected one of {tuple(REGISTRY)}, got {pinned!r}")
        return pinned
    queries, _, hard_negatives = inputs
    k = key(queries, hard_negatives, group_ids, options)
    if k in _choices:
        return _choices[k]
    if torch.compiler.is_compiling() or not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        # No timing inside a traced graph, and none without autograd (an evaluation pass: the
        # measurement runs the backward too): the first candidate, not cached, until a training call.
        return paths[0]
    n, dim = queries.shape
    m = n * (1 + (0 if hard_negatives is None else hard_negatives.shape[1]))
    free = free_bytes(queries.device)
    fits = [
        name
        for name in paths
        if free is None or peak_bytes(name, n, m, dim, queries.element_size(), options.chunk_bytes) <= free
    ]
    if len(fits) <= 1:
        _choices[k] = fits[0] if fits else FALLBACK
        return _choices[k]
    with torch.random.fork_rng(devices=[queries.device] if queries.is_cuda else []):
        results = {name: _run(loss_fn, name, inputs) for name in fits}
        reference = results[fits[0]]
        disagree = [name for name in fits[1:] if not _agree(reference, results[name], queries.dtype)]
        if disagree:
            if k not in _warned:
                _warned.add(k)
                warnings.warn(
                    f"backend='auto': the paths {[fits[0], *disagree]} disagree beyond the {queries.dtype} tolerance "
                    f"for {k}; using backend={FALLBACK!r} for it. Reproduce by calling the loss with each backend= "
                    "on the same inputs, and please report it.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _choices[k] = FALLBACK
            return FALLBACK
        times = {name: TIMER(name, lambda name=name: _run(loss_fn, name, inputs)) for name in fits}
    _choices[k] = min(fits, key=lambda name: (times[name], fits.index(name)))
    return _choices[k]
