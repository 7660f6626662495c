"""Analysis of the fused kernels without a GPU.

- ``counting``: FLOPs and global bytes the kernels ask for, counted under Triton's interpreter.
- ``traffic_model``: the same bytes as arithmetic, for today's design and the designs that would move
  less (``python -m tools.kernel_analysis.traffic_model``).
- ``roofline``: those counts and bytes as a modelled fraction of the matmul peak on an H100 and an
  A100, fused against hybrid (``python -m tools.kernel_analysis.roofline``; modelled, not measured).
- ``ptxas_check``: compile a kernel as the JIT specialises it and read ``ptxas -v``.
- ``compile_for_gpu``: every launch variant compiled for sm_90 / sm_80 / sm_89, held to the register
  and shared-memory limits (``python -m tools.kernel_analysis.compile_for_gpu [--all | --sweep ...]``).
"""
