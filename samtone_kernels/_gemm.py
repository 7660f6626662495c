"""Matrix products with float32 output from 16-bit operands: the GEMMs of the hybrid path and, on a
GPU, of the eager torch backend.

Logits must be float32 whatever the inputs' dtype (bf16 logits at a scale of 20-50 lose ~10% of a
softmax probability), but upcasting the operands first turns a 16-bit tensor-core GEMM into a float32
one, several times slower. ``torch.mm(a, b, out_dtype=torch.float32)`` (CUDA) keeps the operands as
they are and accumulates and returns float32. Elsewhere (CPU GEMMs have no 16-bit path with a
float32 output) the operands are upcast, which computes the same products: a 16-bit value is exact in
float32.
"""

from __future__ import annotations

import torch

HALF = (torch.float16, torch.bfloat16)


def mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` ([m, k] x [k, n]) accumulated and returned in float32, into ``out`` [m, n] (float32,
    contiguous) if given. No autograd (see ``matmul_f32``)."""
    into = {} if out is None else {"out": out}
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return torch.mm(a, b, **into)
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32, **into)
        except (TypeError, RuntimeError, NotImplementedError):  # a torch without mm.dtype
            pass
    return torch.mm(a.float(), b.float(), **into)


def addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc += a @ b`` in place, acc [m, n] float32 (``mm_f32``'s products): one GEMM with beta = 1,
    no [m, n] temporary where the backend has the fused form. No autograd."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return acc.addmm_(a, b)
    if a.is_cuda:
        try:
            return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        except (TypeError, RuntimeError, NotImplementedError):  # a torch without addmm.dtype_out
            pass
    return acc.addmm_(a.float(), b.float())


class _MatmulF32(torch.autograd.Function):
    """S = A B in float32 from operands in their own dtype, with the gradients in theirs."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return mm_f32(a, b)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        # S = A B: dA = dS B^T, dB = A^T dS. dS goes into the GEMMs in the operands' dtype (as the
        # fused kernel's and the hybrid path's coefficient tiles do), accumulated in float32.
        a, b = ctx.saved_tensors
        g = g.to(a.dtype)
        da = mm_f32(g, b.T).to(a.dtype) if ctx.needs_input_grad[0] else None
        db = mm_f32(a.T, g).to(b.dtype) if ctx.needs_input_grad[1] else None
        return da, db


def matmul_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in float32 with autograd, 16-bit operands kept in their dtype (``mm_f32``); float32
    and float64 operands take the plain product."""
    if a.dtype in HALF:
        return _MatmulF32.apply(a, b)
    return a @ b
