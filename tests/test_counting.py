"""tools/kernel_analysis/counting.py on hand-written kernels whose FLOPs and bytes are known exactly.

Interpreter only: conftest sets TRITON_INTERPRET=1 before triton is imported when no CUDA device is
present; on a CUDA machine the kernels are compiled, the interpreter hooks never fire, and these skip.
"""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

from tools.kernel_analysis.counting import count_kernel_work

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="counts only under the Triton interpreter"
)


@triton.jit
def _copy_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)


@triton.jit
def _scale_kernel(X, S, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs)  # unmasked: every lane counts, in-bounds or not (n is a multiple of BLOCK)
    tl.store(X + offs, x * tl.load(S))  # scalar load


@triton.jit
def _matmul_kernel(A, B, C, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a = tl.load(A + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        b = tl.load(B + rk[:, None] * N + rn[None, :], mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
    tl.store(C + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("n", [1, 100, 256])
def test_masked_copy_counts_only_unmasked_elements(dtype: torch.dtype, n: int) -> None:
    x, y = torch.randn(n, dtype=dtype), torch.empty(n, dtype=dtype)
    with count_kernel_work() as counts:
        _copy_kernel[(triton.cdiv(n, 64),)](x, y, n, BLOCK=64)
    assert torch.equal(x, y)
    nbytes = n * x.element_size()
    assert counts.per_kernel == {
        "_copy_kernel": dict(flops=0, load_bytes=nbytes, store_bytes=nbytes, launches=1, programs=triton.cdiv(n, 64))
    }
    assert (counts.flops, counts.load_bytes, counts.store_bytes) == (0, nbytes, nbytes)


def test_unmasked_and_scalar_loads_and_per_kernel_keys() -> None:
    x, y, s = torch.randn(128), torch.empty(128), torch.tensor([2.0])
    with count_kernel_work() as counts:
        _copy_kernel[(2,)](x, y, 128, BLOCK=64)
        _scale_kernel[(4,)](y, s, 128, BLOCK=32)
        _scale_kernel[(4,)](y, s, 128, BLOCK=32)
    assert torch.equal(y, 4 * x)
    scale = counts.per_kernel["_scale_kernel"]
    assert scale == dict(flops=0, load_bytes=2 * (128 + 4) * 4, store_bytes=2 * 128 * 4, launches=2, programs=8)
    assert counts.per_kernel["_copy_kernel"]["load_bytes"] == 128 * 4
    assert counts.load_bytes == (128 + 2 * 132) * 4 and counts.store_bytes == 3 * 128 * 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_matmul_k_loop_flops_and_tile_bytes(dtype: torch.dtype) -> None:
    M, N, K, BM, BN, BK = 32, 48, 64, 16, 16, 16
    a, b, c = torch.randn(M, K, dtype=dtype), torch.randn(K, N, dtype=dtype), torch.empty(M, N)
    with count_kernel_work() as counts:
        _matmul_kernel[(M // BM, N // BN)](a, b, c, M, N, K, BM=BM, BN=BN, BK=BK)
    torch.testing.assert_close(c, a.float() @ b.float(), atol=1e-2, rtol=1e-2)
    row = counts.per_kernel["_matmul_kernel"]
    assert row["flops"] == 2 * M * N * K
    # Each program reads its BM rows of A and BN columns of B over all of K.
    size = a.element_size()
    assert row["load_bytes"] == (N // BN) * M * K * size + (M // BM) * K * N * size
    assert row["store_bytes"] == M * N * 4 and row["programs"] == (M // BM) * (N // BN)


def test_ragged_matmul_counts_padded_flops_but_only_real_bytes() -> None:
    """tl.dot multiplies whole tiles, masked or not; loads and stores count only in-bounds elements."""
    M, N, K, BM, BN, BK = 20, 17, 40, 16, 16, 16
    a, b, c = torch.randn(M, K), torch.randn(K, N), torch.empty(M, N)
    with count_kernel_work() as counts:
        _matmul_kernel[(2, 2)](a, b, c, M, N, K, BM=BM, BN=BN, BK=BK)
    torch.testing.assert_close(c, a @ b, atol=1e-3, rtol=1e-3)
    assert counts.flops == 2 * (2 * BM) * (2 * BN) * (3 * BK)
    assert counts.load_bytes == 2 * M * K * 4 + 2 * K * N * 4 and counts.store_bytes == M * N * 4


def test_hooks_are_restored_on_exit_and_on_error() -> None:
    before = dict(vars(interpreter.InterpreterBuilder)), interpreter.GridExecutor.__call__
    with pytest.raises(RuntimeError), count_kernel_work():
        raise RuntimeError("boom")
    assert (dict(vars(interpreter.InterpreterBuilder)), interpreter.GridExecutor.__call__) == before
    with count_kernel_work() as counts:
        pass
    x, y = torch.randn(8), torch.empty(8)
    _copy_kernel[(1,)](x, y, 8, BLOCK=64)  # after exit: not counted
    assert counts.per_kernel == {} and counts.flops == counts.load_bytes == 0
