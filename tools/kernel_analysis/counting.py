"""Count the work Triton kernels ask for while they run under the interpreter (``TRITON_INTERPRET=1``).

Counted, per launched kernel (keyed by the ``@triton.jit`` function's ``__name__``):

* ``flops``: ``2 * M * N * K`` for every ``tl.dot`` executed (batch dims multiply), accumulator or not;
* ``load_bytes`` / ``store_bytes``: for every global ``tl.load`` / ``tl.store`` (block of pointers, scalar
  pointer, or tensor descriptor), the elements whose mask is True times the pointee's element size; an
  unmasked access counts every element;
* ``launches`` (grid launches) and ``programs`` (program instances run).

It counts what the kernel *asks for*, not what reaches HBM: caches (L1/L2), coalescing, sector
granularity and the re-reads they save or cost are ignored. Also ignored: atomics, ``tl.dot_scaled``,
element-wise FLOPs, and anything outside the interpreter (compiled GPU kernels are not counted). An
autotuner benchmarking several configs launches the kernel once per config; those launches count too.

It hooks triton 3.9's ``triton.runtime.interpreter``: ``InterpreterBuilder.create_dot``,
``create_masked_load`` and ``create_masked_store`` (the unmasked ``create_load`` / ``create_store`` and
the descriptor loads/stores all go through these two), ``set_grid_idx`` (one call per program), and
``GridExecutor.__call__`` (one call per launch; ``self.fn`` is the kernel). The patches are undone on exit.

    with count_kernel_work() as counts:
        run_something_that_launches_kernels()
    counts.flops, counts.load_bytes, counts.store_bytes   # totals
    counts.per_kernel   # {"_fwd_kernel": {"flops": ..., "load_bytes": ..., "store_bytes": ..., ...}}
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # the self-test below: the switch must precede importing triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter as _interp  # noqa: E402

FIELDS = ("flops", "load_bytes", "store_bytes", "launches", "programs")
OUTSIDE = "<no launch>"  # key for work done outside any kernel launch (should stay empty)


class KernelWork:
    """Counters filled by :func:`count_kernel_work`; ``per_kernel[name][field]`` holds ints."""

    def __init__(self) -> None:
        self.per_kernel: dict[str, dict[str, int]] = {}
        self._current = OUTSIDE

    def add(self, field: str, amount: int) -> None:
        row = self.per_kernel.setdefault(self._current, dict.fromkeys(FIELDS, 0))
        row[field] += int(amount)

    def total(self, field: str) -> int:
        return sum(row[field] for row in self.per_kernel.values())

    flops = property(lambda self: self.total("flops"))
    load_bytes = property(lambda self: self.total("load_bytes"))
    store_bytes = property(lambda self: self.total("store_bytes"))

    def __repr__(self) -> str:
        return f"KernelWork({self.per_kernel!r})"


def _access_bytes(ptrs: Any, mask: Any) -> int:
    """Bytes of the active lanes of a load/store: ``count(mask broadcast to ptrs) * itemsize``."""
    ty = ptrs.dtype.scalar.element_ty  # handle dtype is the (scalar) pointer type; take its pointee
    itemsize = 8 if isinstance(ty, tl.pointer_type) else (ty.primitive_bitwidth + 7) // 8
    active = np.count_nonzero(np.broadcast_to(np.asarray(mask.data, dtype=bool), np.shape(ptrs.data)))
    return int(active) * itemsize


@contextmanager
def count_kernel_work() -> Iterator[KernelWork]:
    """Count dot FLOPs and load/store bytes of interpreted kernel launches made inside the block."""
    work = KernelWork()
    builder, executor = _interp.InterpreterBuilder, _interp.GridExecutor
    saved: list[tuple[type, str, Callable[..., Any]]] = []

    def patch(cls: type, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        orig = cls.__dict__[name]
        saved.append((cls, name, orig))
        setattr(cls, name, make(orig))

    def dot(orig: Callable[..., Any]) -> Callable[..., Any]:
        def create_dot(self: Any, a: Any, b: Any, *args: Any, **kwargs: Any) -> Any:
            a_shape, b_shape = np.shape(a.data), np.shape(b.data)  # (..., M, K) @ (..., K, N)
            work.add("flops", 2 * int(np.prod(a_shape[:-1])) * b_shape[-1] * a_shape[-1])
            return orig(self, a, b, *args, **kwargs)

        return create_dot

    def load(orig: Callable[..., Any]) -> Callable[..., Any]:
        def create_masked_load(self: Any, ptrs: Any, mask: Any, *args: Any, **kwargs: Any) -> Any:
            work.add("load_bytes", _access_bytes(ptrs, mask))
            return orig(self, ptrs, mask, *args, **kwargs)

        return create_masked_load

    def store(orig: Callable[..., Any]) -> Callable[..., Any]:
        def create_masked_store(self: Any, ptrs: Any, value: Any, mask: Any, *args: Any, **kwargs: Any) -> Any:
            work.add("store_bytes", _access_bytes(ptrs, mask))
            return orig(self, ptrs, value, mask, *args, **kwargs)

        return create_masked_store

    def program(orig: Callable[..., Any]) -> Callable[..., Any]:
        def set_grid_idx(self: Any, *args: Any, **kwargs: Any) -> Any:
            work.add("programs", 1)
            return orig(self, *args, **kwargs)

        return set_grid_idx

    def launch(orig: Callable[..., Any]) -> Callable[..., Any]:
        def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
            outer, work._current = work._current, self.fn.__name__
            try:
                work.add("launches", 1)
                return orig(self, *args, **kwargs)
            finally:
                work._current = outer

        return __call__

    try:
        patch(builder, "create_dot", dot)
        patch(builder, "create_masked_load", load)
        patch(builder, "create_masked_store", store)
        patch(builder, "set_grid_idx", program)
        patch(executor, "__call__", launch)
        yield work
    finally:
        for cls, name, orig in reversed(saved):
            setattr(cls, name, orig)


if __name__ == "__main__":
    import torch
    import triton

    @triton.jit
    def _selftest_kernel(X, W, Y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + offs[:, None] * 16 + tl.arange(0, 16)[None, :], mask=offs[:, None] < n, other=0.0)
        w = tl.load(W + tl.arange(0, 16)[:, None] * 16 + tl.arange(0, 16)[None, :])
        y = tl.dot(x, w, tl.zeros((BLOCK, 16), tl.float32) + tl.load(X))
        tl.store(Y + offs[:, None] * 16 + tl.arange(0, 16)[None, :], y, mask=offs[:, None] < n)

    n = 20
    x, w, y = torch.randn(n, 16), torch.randn(16, 16), torch.empty(n, 16)
    with count_kernel_work() as c:
        _selftest_kernel[(2,)](x, w, y, n, BLOCK=16)
    row = c.per_kernel["_selftest_kernel"]
    assert row["flops"] == 2 * 2 * 16 * 16 * 16, row  # two 16x16x16 tiles (masked rows still multiply)
    assert row["load_bytes"] == (n * 16 + 2 * 16 * 16 + 2) * 4, row  # X rows, W twice, scalar X[0] twice
    assert row["store_bytes"] == n * 16 * 4 and row["launches"] == 1 and row["programs"] == 2, row
    assert _interp.InterpreterBuilder.create_dot.__qualname__ == "InterpreterBuilder.create_dot"  # restored
    print(c.per_kernel)
