"""Compile every fused kernel variant to GPU machine code, without a GPU.

Run as a script with TRITON_INTERPRET=0 (the test suite does, in a subprocess): for each kernel,
each constexpr flag combination the launchers use, each input dtype, and the smallest and largest
autotune tiles, Triton lowers the kernel through LLVM to PTX and ptxas assembles it for Hopper
(sm_90) and Ampere (sm_80). This catches what the interpreter cannot: type errors of the compiled
frontend, illegal dot shapes, shared memory over the limit.
"""

from __future__ import annotations

import itertools
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run with TRITON_INTERPRET=0"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from samtone_kernels import _triton as K  # noqa: E402

NORMS = {"RX", "RQ", "RD", "RNEG", "RY", "RP"}  # inverse norms of the rows (float32)
FP32_POINTERS = {"SCALE", "LSE", "COEF", "DX", "DY", "LSE_Q", "COEF_Q", "LSE_D", "COEF_D", "BUF", "POS", "FACTOR",
                 "DOTS"} | NORMS
POINTERS = {"X", "Q", "D", "NEG", "Y", "G", "OUT", "P"} | FP32_POINTERS
TILES = [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, num_warps=4, num_stages=2),
         dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=64, num_warps=8, num_stages=3)]
DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def signature(kernel, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "G":
            sig[name] = "*i64"
        elif name in FP32_POINTERS:
            sig[name] = "*fp32"
        elif name in POINTERS:
            sig[name] = DTYPES[dtype]
        else:
            sig[name] = "i32"  # strides and sizes, unspecialised (the general, strided case)
    return sig


def variants():
    """(kernel, flags) for every launch the launchers make (see _anchor_flags and the backward op).
    NORMED (tiles scaled by inverse norms) follows another flag, so each kernel compiles with both."""
    for doc_anchor, q2q, d2d, groups in itertools.product([False, True], repeat=4):
        if not doc_anchor and d2d or doc_anchor and q2q:
            continue  # flags that do not change this anchor kind's launch
        flags = dict(K._anchor_flags(doc_anchor, q2q, d2d), HAS_GROUPS=groups, NORMED=groups)
        yield K._lse_fwd_kernel.fn, flags
        yield K._anchor_grad_kernel.fn, flags
    for (use_qa, use_da, qa_excl, da_excl, group), accumulate in itertools.product([
        (True, True, True, False, True),    # queries as candidates: q2q and d2q
        (False, True, True, False, False),  # queries as candidates: d2q only
        (True, False, True, False, True),   # queries as candidates: q2q only
        (True, True, False, True, True),    # positives: q2d and d2d
        (True, False, False, True, False),  # hard negatives: q2d only
    ], [False, True]):  # a new buffer, or added to the anchor side's (candidates are the anchors)
        yield K._candidate_grad_kernel.fn, dict(USE_QA=use_qa, QA_EXCL=qa_excl, USE_DA=use_da,
                                                DA_EXCL=da_excl, GROUP=group, ACCUMULATE=accumulate,
                                                NORMED=accumulate)
    for has_partner, normed in itertools.product([False, True], repeat=2):
        yield K._epilogue_kernel, dict(HAS_PARTNER=has_partner, NORMED=normed, BLOCK_R=16, BLOCK_D=128)


def main() -> int:
    # Each variant once, rotating through the dtype x tile pairs and the two architectures, so every
    # pair and both targets are covered in well under a minute (--all compiles every combination).
    everything = "--all" in sys.argv
    pairs = list(itertools.product(DTYPES, TILES))
    count = 0
    for i, (kernel, flags) in enumerate(variants()):
        for j, (dtype, tile) in enumerate(pairs):
            if not everything and j != i % len(pairs):
                continue
            meta = {k: v for k, v in tile.items() if k.startswith("BLOCK")}
            constexprs = {k: v for k, v in {"PRECISION": "tf32" if dtype == "fp32" else "ieee", **meta,
                                            **flags}.items() if k in kernel.arg_names}
            src = ASTSource(fn=kernel, signature=signature(kernel, dtype, constexprs), constexprs=constexprs)
            for arch in (90, 80):
                if not everything and arch != (80 if i % 4 == 3 else 90):
                    continue
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                          options=dict(num_warps=tile["num_warps"], num_stages=tile["num_stages"]))
                assert compiled.asm.get("cubin"), (kernel.__name__, flags, dtype, arch)
                count += 1
                print(f"sm_{arch} {kernel.__name__:<24} {dtype} {meta} {flags}: "
                      f"{compiled.metadata.shared} B shared", flush=True)
    print(f"compiled {count} kernels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
