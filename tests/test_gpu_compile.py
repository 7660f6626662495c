"""The fused kernels compile to GPU machine code (sm_90, sm_80, sm_89) on a machine without a GPU, as
the JIT specialises them, within the shared memory the autotuner's prune allows and without register
spills in 16-bit (``tools/kernel_analysis/compile_for_gpu.py``).

The compile runs in a subprocess, so it starts as soon as the run's tests are collected (``start``,
called by conftest when this test is selected) and runs on every core but one (CI's two cores: one
worker) beside the other tests, which keep to that one; this test runs last and waits for it."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_job: tuple[subprocess.Popen, tempfile.TemporaryFile] | None = None


def start() -> bool:
    """Launch the compile in the background, once (its output goes to a file: a pipe could fill);
    True when it runs (triton is installed)."""
    global _job
    if _job is None and importlib.util.find_spec("triton") is not None:
        # A compile worker per core but one: the in-process tests hold that one (conftest).
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
        env = dict(
            os.environ,
            TRITON_INTERPRET="0",
            TRITON_DEFAULT_FP_FUSION="1",
            COMPILE_WORKERS=os.environ.get("COMPILE_WORKERS", str(max(1, cores - 1))),
        )
        log = tempfile.TemporaryFile("w+")
        _job = (
            subprocess.Popen(
                [sys.executable, "-m", "tools.kernel_analysis.compile_for_gpu"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            ),
            log,
        )
    return _job is not None


def stop() -> None:
    """Kill the compile if it still runs (a run that ended before the test that waits for it)."""
    if _job is not None and _job[0].poll() is None:
        _job[0].kill()
        _job[0].wait()


def test_every_kernel_variant_compiles_for_hopper_ampere_and_ada():
    pytest.importorskip("triton")
    start()
    process, log = _job
    try:
        process.wait(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    log.seek(0)
    output = log.read()
    log.close()
    assert process.returncode == 0, output[-6000:]
    compiled = re.search(r"compiled (\d+) kernels, 0 failures", output)
    assert compiled and int(compiled.group(1)) >= 50, output[-2000:]  # 36 variants, 8 epilogues, 10 more


# Two dots of a sweep as Triton 3.9 compiled them for sm_90 (8 warps, a 64 x 64 tile, K = 64): the
# first of an accumulator chain laid out with all warps along M, the second with the warps split.
_TTGIR = """\
#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 2], instrShape = [16, 32, 16]}>
#mma1 = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], instrShape = [16, 32, 16]}>
#mma2 = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [8, 1], instrShape = [16, 8]}>
    %a = ttng.warp_group_dot %c, %y, %z {inputPrecision = 0 : i32, isAsync = true} : \
tensor<64x64xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma1, kWidth = 2}>> * \
!ttg.memdesc<64x64xbf16, #shared, #smem, mutable> -> tensor<64x64xf32, #mma1> loc(#loc1)
    %b = ttng.warp_group_dot %c, %y, %a {inputPrecision = 0 : i32, isAsync = true} : \
tensor<64x64xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma, kWidth = 2}>> * \
!ttg.memdesc<64x64xbf16, #shared, #smem, mutable> -> tensor<64x64xf32, #mma> loc(#loc2)
    %d = tt.dot %u, %v, %w, inputPrecision = tf32 : tensor<64x32xf32, #ttg.dot_op<{opIdx = 0, parent = #mma2}>> * \
tensor<32x128xf32, #ttg.dot_op<{opIdx = 1, parent = #mma2}>> -> tensor<64x128xf32, #mma2> loc(#loc3)
"""


def test_mma_work_finds_the_warps_that_repeat_a_product():
    from tools.kernel_analysis.tensor_cores import mma_work

    chained, split, ampere = mma_work(_TTGIR, num_warps=8)
    # 64 x 64 x 64 in m64n32k16 instructions: 8 of them. Two warpgroups along M on 64 rows issue 16.
    assert chained["tile"] == (64, 64, 64) and chained["warps"] == (8, 1)
    assert (chained["issued"], chained["useful"]) == (16, 8)
    assert (split["issued"], split["useful"]) == (8, 8)
    # mma.sync, tf32 (k = 8): 8 warps x 16 rows covers the 64 rows twice over.
    assert ampere["tile"] == (64, 128, 32) and not ampere["wgmma"]
    assert (ampere["issued"], ampere["useful"]) == (8 * 1 * 16 * 4, 64 * 128 * 32 // (16 * 8 * 8))
