"""Compile a Triton kernel as the JIT would specialise it, and read its GPU resource usage, without a GPU.

``compile_for_gpu.py`` compiles every kernel with each integer argument left generic. At run time the
JIT specialises them (triton/runtime/jit.py ``create_function_from_signature`` -> the native
``specialize_impl``, then ``JITFunction._pack_args``):

* an int argument equal to 1 becomes a compile-time constant: its signature entry is ``"constexpr"``
  and the value 1 goes into the constants (the last stride of a contiguous tensor);
* an int argument that is a multiple of 16 (0 included), and a tensor whose ``data_ptr()`` is a
  multiple of 16, keep their type but get the attribute ``[["tt.divisibility", 16]]``
  (``BaseBackend.parse_attr("D")``), keyed by the argument's index path ``(i,)`` in ``attrs``.

``compile_kernel`` reproduces that through ``ASTSource(fn, signature, constexprs, attrs)``, and keeps
the ``ptxas -v`` log of Triton's own ``make_cubin`` (``TRITON_DUMP_PTXAS_LOG``); ``resource_usage``
parses registers and spills from that log, or, when the compile came from Triton's cache and ran no
ptxas, runs ptxas -v on the PTX with the same binary and flags; ``fits`` compares shared memory with
the per-block opt-in maximum of the target GPU.

Import with TRITON_INTERPRET=0 (or unset); ``compile_for_gpu.py`` is its user. Measured on the
2-core machine: a compile takes 2.5-4 s, a second ptxas -v another 0.5-0.9 s (which reading
Triton's log saves).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable, Mapping

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run with TRITON_INTERPRET=0"

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

# Shared memory one thread block may use after opting in (cudaDevAttrMaxSharedMemoryPerBlockOptin), in
# bytes: the per-SM shared memory capacity minus the 1 KB CUDA reserves per block, as NVIDIA's tuning
# guides state it. Hopper tuning guide (H100, sm_90): up to 228 KB per SM -> 227 KB per block; Ampere
# tuning guide (A100, sm_80): 164 KB per SM -> 163 KB per block (8.6 parts: 100 KB -> 99 KB); Ada tuning
# guide (RTX 4090, sm_89): 100 KB per SM -> 99 KB per block. These are also the sharedMemPerBlockOptin
# values the devices report. Triton refuses to load a kernel whose metadata.shared exceeds this
# (CompiledKernel._init_handles -> OutOfResources), so it is the limit to test against.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 89: 99 * 1024}  # 232448, 166912, 101376
REGISTER_LIMIT = 255  # per thread, every architecture here (a 64K-register file)


def signature(kernel, constexprs: Mapping, types: Mapping[str, str], default: str = "i32") -> dict:
    """{name: type} for every argument of ``kernel`` (a JITFunction): ``"constexpr"`` for the names in
    ``constexprs``, ``types[name]`` where given, else ``default`` (sizes and strides)."""
    return {name: "constexpr" if name in constexprs else types.get(name, default) for name in kernel.arg_names}


def compile_kernel(
    fn,
    signature: dict,
    constexprs: dict,
    *,
    arch: int,
    num_warps: int,
    num_stages: int,
    unit: Iterable[str] = (),
    divisible: Iterable[str] = (),
    maxnreg: int | None = None,
):
    """``triton.compile`` for ``GPUTarget("cuda", arch, 32)``, specialised like the JIT would:
    ``unit`` names int arguments equal to 1 (compiled as the constant 1), ``divisible`` names pointer or
    int arguments marked divisible by 16 (``tt.divisibility = 16``); ``maxnreg``: a config's register cap
    (PTX ``.maxnreg``). Returns the CompiledKernel
    (``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata``) with ``ptxas_log``: what Triton's own
    ``ptxas -v`` printed, or None when the kernel came from Triton's cache."""
    unit, divisible = set(unit), set(divisible)
    sig, consts = dict(signature), dict(constexprs)
    for name in unit | divisible:
        if name not in fn.arg_names:
            raise KeyError(f"{fn.__name__} has no argument {name!r}")
        if sig.get(name) == "constexpr" or name in consts:
            raise ValueError(f"{name!r} is already a constexpr")
    if unit & divisible:
        raise ValueError(f"1 is not a multiple of 16: {sorted(unit & divisible)}")
    for name in unit:
        if not re.fullmatch(r"[iu]\d+", sig[name]):
            raise ValueError(f"only int arguments specialise to 1, not {name!r}: {sig[name]}")
        sig[name], consts[name] = "constexpr", 1  # what specialize_impl gives an int equal to 1
    for name in divisible:
        if not (sig[name].startswith("*") or re.fullmatch(r"[iu]\d+", sig[name])):
            raise ValueError(f"divisibility applies to pointers and ints, not {name!r}: {sig[name]}")
    # As JITFunction._pack_args builds it: every pointer, int and constexpr argument in order, [] where
    # nothing is known, so that ASTSource.hash() (and the cache entry) equals the JIT's own compile.
    attrs = {
        (i,): [["tt.divisibility", 16]] if name in divisible else []  # parse_attr("D") / parse_attr("")
        for i, name in enumerate(fn.arg_names)
        if sig[name] == "constexpr" or sig[name].startswith("*") or re.fullmatch(r"[iu]\d+", sig[name])
    }
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    printed, dump = io.StringIO(), knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints its ptxas -v log
    try:
        with contextlib.redirect_stdout(printed):
            compiled = triton.compile(
                src,
                target=GPUTarget("cuda", arch, 32),
                options=dict(num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg),
            )
    finally:
        knobs.nvidia.dump_ptxas_log = dump
    log = printed.getvalue()
    compiled.ptxas_log = log if _REGS.search(log) else None
    return compiled


def ptxas_path(arch: int) -> str:
    """The ptxas Triton assembles this architecture with (bundled: ``ptxas`` below sm_90, the newer
    ``ptxas-blackwell`` from sm_90; TRITON_PTXAS_PATH / TRITON_PTXAS_BLACKWELL_PATH override)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


_TARGET = re.compile(r"^\s*\.target\s+(sm_\w+)", re.MULTILINE)
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def resource_usage(compiled, arch: int) -> dict:
    """Registers per thread, spill bytes and stack frame from ``ptxas -v`` on the kernel's PTX, and
    shared memory (bytes per block, Triton's dynamic allocation) from ``compiled.metadata.shared``.

    Without a GPU this is the only way: ``CompiledKernel.n_regs`` / ``n_spills`` are set only when the
    cubin is loaded onto a device (``driver.active.utils.load_binary``, there ``n_spills`` is the local
    memory size / 4), and ``metadata`` carries neither."""
    ptx = compiled.asm["ptx"]
    target = _TARGET.search(ptx).group(1)  # sm_90a for 90, sm_80, sm_89
    if not re.fullmatch(rf"sm_{arch}a?", target):
        raise ValueError(f"PTX targets {target}, not sm_{arch}")
    opt = compiled.metadata
    log = getattr(compiled, "ptxas_log", None)  # Triton's own run, when the compile made the cubin
    if log is None:
        # Same flags as CUDABackend.make_cubin, so the figures are those of the cubin Triton produced.
        flags = ["-lineinfo", "-v", "--regAllocOptLevel=2"]
        if not getattr(opt, "enable_fp_fusion", True):
            flags.append("--fmad=false")
        if getattr(opt, "ptx_options", None):
            flags += opt.ptx_options.split()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            run = subprocess.run(
                [ptxas_path(arch), *flags, f"--gpu-name={target}", path, "-o", os.path.join(tmp, "kernel.cubin")],
                capture_output=True,
                text=True,
            )
        log = run.stdout + run.stderr
        if run.returncode:
            raise RuntimeError(f"ptxas failed ({run.returncode}):\n{log}")
    # One entry function per Triton kernel; should there be more, report the worst.
    regs, spills = [int(n) for n in _REGS.findall(log)], _SPILLS.findall(log)
    if not regs or not spills:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return dict(
        registers=max(regs),
        spill_stores=max(int(s[1]) for s in spills),
        spill_loads=max(int(s[2]) for s in spills),
        stack=max(int(s[0]) for s in spills),
        shared=opt.shared,
        target=target,
        log=log,
    )


def fits(usage_or_compiled, arch: int) -> bool:
    """Whether the kernel's shared memory is within the per-block opt-in maximum of ``arch``."""
    shared = (
        usage_or_compiled["shared"] if isinstance(usage_or_compiled, Mapping) else usage_or_compiled.metadata.shared
    )
    return shared <= SHARED_LIMIT[arch]
