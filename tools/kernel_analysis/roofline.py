"""A roofline model of the two GPU paths: each path's counted matmul work and modelled bytes turned
into a fraction of the bfloat16 matmul rate. Arithmetic, **modelled, not measured**: no figure here
is a timing, and a GPU may disagree with every one of them (which is why ``backend="auto"`` measures).

    python -m tools.kernel_analysis.roofline      # the table of bench/RESULTS.md

Per kernel, time = max(FLOPs / (peak x attainable), bytes / bandwidth), summed over the kernels; the
fraction is the textbook FLOPs (3 tile products per block) / peak / time.

- The fused kernels: executed work ``_plan.tile_units``; bytes ``traffic_model.bytes_by_kernel`` at
  the tile each GPU is offered (sm_90: 64 x 64 paired, two tiles per sweep; sm_80: 64 x 128, each
  segment alone, one tile per sweep) and, where a resident config serves D (``configs.RESIDENT_TILES``:
  D <= 256 on both), the fewer of those and the resident backward's (``RESIDENT_OFFERED``; the
  autotuner times both). Attainable fraction of the tensor
  rate in their dot products: ``FUSED_ATTAINABLE``, from a review of the compiled kernels (PTX and
  ``ptxas -v``): on sm_90 the K-loop is capped near half the rate by shared-memory reads (the
  estimate was made when each sweep's first dot was also issued twice, since fixed, and is kept);
  the sm_80 walk uses mma.sync.
- The hybrid path: GEMM work 4 units per block with no partner, 4 for the q-d tile serving q2d and
  d2q, 3 for a symmetric tile (``_triton/hybrid.py``); at ``GEMM_ATTAINABLE`` of the rate. Bytes per
  logit: the forward GEMM writes the float32 logits (4) and the epilogue reads them (4); the backward
  GEMM writes them again (4), the coefficient kernel reads them and writes G (4 + 2), and each GEMM
  reading G reads it (2 each). The operands' and accumulators' O(N D) traffic is left out.

What it leaves out matters most for the fused kernels: their bytes are the global loads and stores
as counted, with no cache, while their re-reads of the same candidate tiles largely hit L2 on a GPU.
Their fraction here is a lower bound (bandwidth-bound in the model at every D); the hybrid path's
traffic is mostly the float32 logits, which no cache holds at these sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

from samtone_kernels import _plan as plan
from samtone_kernels._triton import configs
from tools.kernel_analysis import traffic_model


@dataclass(frozen=True)
class Gpu:
    name: str
    arch: int
    bf16_tflops: float  # dense tensor-core peak
    bandwidth_tbs: float  # HBM


# The vendors' datasheet peaks (dense bfloat16; SXM parts).
GPUS = (Gpu("H100 SXM", 90, 989.0, 3.35), Gpu("A100 SXM 80 GB", 80, 312.0, 2.04))
FUSED_ATTAINABLE = {90: 0.4, 80: 0.5}  # of the tensor rate, in the fused kernels' dot products
GEMM_ATTAINABLE = 0.7  # cuBLAS at these shapes, assumed
OFFERED = {90: (64, 64, traffic_model.TODAY), 80: (64, 128, traffic_model.Design(fused_epilogue=True))}
# The resident backward's rows and columns by the largest D they serve, per modelled GPU.
RESIDENT_OFFERED = {arch: {t[2]: (t[0], t[1]) for t in configs.RESIDENT_TILES[arch]} for arch in (90, 80)}
FORWARD_BYTES_PER_LOGIT = 8
BACKWARD_BYTES_PER_LOGIT = {"pair": 4 + 6 + 4, "symmetric": 4 + 6 + 2}


def fused_fraction(gpu: Gpu, directions, n_pairs: int, dim: int) -> float:
    block_m, block_n, design = OFFERED[gpu.arch]
    executed, textbook = plan.tile_units(directions, 0, shared=True)
    unit = 2 * n_pairs * n_pairs * dim
    flops = executed * unit
    byte_count = sum(traffic_model.bytes_by_kernel(directions, n_pairs, dim, 0, 2, block_m, block_n, design).values())
    widths = [w for w in RESIDENT_OFFERED.get(gpu.arch, {}) if dim <= w]
    if widths:  # the resident backward, beside the offered forward
        forward = traffic_model.bytes_by_kernel(directions, n_pairs, dim, 0, 2, block_m, block_n, design)
        rows, cols = RESIDENT_OFFERED[gpu.arch][min(widths)]
        back = traffic_model.bytes_by_kernel(directions, n_pairs, dim, 0, 2, rows, cols, traffic_model.RESIDENT)
        byte_count = min(byte_count, forward["lse_kernel"] + back["grad_kernel"] + back["epilogue_kernel"])
    seconds = max(
        flops / (gpu.bf16_tflops * 1e12 * FUSED_ATTAINABLE[gpu.arch]), byte_count / (gpu.bandwidth_tbs * 1e12)
    )
    return textbook * unit / (gpu.bf16_tflops * 1e12) / seconds


def hybrid_fraction(gpu: Gpu, directions, n_pairs: int, dim: int) -> float:
    from samtone_kernels._triton.hybrid import pairs

    logits = n_pairs * n_pairs
    seconds = 0.0
    for x, seg, _ in pairs(directions, True, False, None, False):
        symmetric = seg == x
        units = 3 if symmetric else 4  # forward, recompute, G Y (and G^T X)
        flops = units * 2 * logits * dim
        byte_count = logits * (FORWARD_BYTES_PER_LOGIT + BACKWARD_BYTES_PER_LOGIT["symmetric" if symmetric else "pair"])
        gemm = flops / (gpu.bf16_tflops * 1e12 * GEMM_ATTAINABLE)
        seconds += gemm + byte_count / (gpu.bandwidth_tbs * 1e12)  # the epilogues do not overlap the GEMMs
    textbook = sum(3 * 2 * logits * dim for b in plan.selected(directions) if b.segment != "n")
    return textbook / (gpu.bf16_tflops * 1e12) / seconds


def table(directions=("q2d", "q2q"), dims=(64, 128, 256, 768, 1024), sizes=(4096, 16384, 65536)) -> str:
    lines = [
        f"SamToNe {directions}, bfloat16, no hard negatives: modelled fraction of the bf16 matmul peak "
        "(fused / hybrid), and the path auto is expected to pick. MODELLED, NOT MEASURED.",
        "",
        "| GPU | D | " + " | ".join(f"N = {n}" for n in sizes) + " |",
        "|---|---|" + "---|" * len(sizes),
    ]
    for gpu in GPUS:
        for dim in dims:
            cells = []
            for n in sizes:
                fused, hybrid = fused_fraction(gpu, directions, n, dim), hybrid_fraction(gpu, directions, n, dim)
                cells.append(f"{fused:.2f} / {hybrid:.2f} ({'fused' if fused >= hybrid else 'hybrid'})")
            lines.append(f"| {gpu.name} | {dim} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
