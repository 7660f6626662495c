"""The fused kernels compile to GPU machine code (sm_90, sm_80, sm_89) on a machine without a GPU, as
the JIT specialises them, within the shared memory the autotuner's prune allows and without register
spills in 16-bit (``compile_for_gpu.py``)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("compile_for_gpu.py")


def test_every_kernel_variant_compiles_for_hopper_ampere_and_ada():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    compiled = re.search(r"compiled (\d+) kernels, 0 failures", result.stdout)
    assert compiled and int(compiled.group(1)) >= 50, result.stdout[-2000:]  # 36 variants, 8 epilogues, 10 more
