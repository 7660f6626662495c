"""Compile the fused kernels to GPU machine code as the JIT compiles them at run time, without a GPU,
and hold them to the hardware's limits with ``ptxas -v``.

Run as a script with TRITON_INTERPRET=0 (the test suite does, in a subprocess). Every launch variant
comes from ``plan`` (all direction sets, with and without a gathered batch, with and without group
ids). Each is compiled for a contiguous launch (last strides the constant 1, the rest and every
pointer divisible by 16: what the JIT specialises for contiguous inputs), and in ``--all`` mode for
a strided one too. Failures:

* a 16-bit compile of a contiguous launch that spills registers (strided launches, the rare case,
  are compiled and their spills printed);
* a dot whose warps repeat each other's tensor-core work (``tensor_cores.mma_work``: issued more
  wgmma / mma.sync instructions than its tile needs);
* a config whose shared memory exceeds ``configs.shared_bytes`` (the bound the autotuner prunes
  with), or that the prune keeps for an architecture whose limit it exceeds.

float32 is compiled with ``"ieee"`` (the default: torch's "highest" matmul precision) and ``"tf32"``;
its spills are printed, not failed on (see bench/RESULTS.md for the figures and why).

Default (CI): each variant once (NORMED following the group flag), in bfloat16, float16 and float32
with "tf32" in rotation, configs and sm_90 / sm_80 / sm_89 in rotation; every autotune config for the
heaviest backward variant in bfloat16 (its last sweep writing the gradient, and with NORMED, the
epilogue's), and that variant strided on each architecture; float32 with
"ieee" for the heaviest forward and backward variants on each architecture (an "ieee" compile spills
and takes about 3x as long as a 16-bit one, and its spills are not failed on). ``--all``: every
variant x dtype x config x architecture x stride kind (hours on two cores). ``--sweep 80,89
64,128,64,8,3,0,1 ...``: every variant x the given configs (``PAIRED,SPAN`` optional: the kernels'
defaults, paired and 2) and architectures in bfloat16 (the spill tables of bench/RESULTS.md).
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from multiprocessing import Pool

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run with TRITON_INTERPRET=0"

from samtone_kernels import _plan as plan  # noqa: E402
from samtone_kernels._triton import configs as C  # noqa: E402
from samtone_kernels._triton import hybrid  # noqa: E402
from samtone_kernels._triton import kernels as K  # noqa: E402
from samtone_kernels._triton.epilogue import epilogue_kernel  # noqa: E402
from samtone_kernels._triton.logit_epilogues import coefficient_kernel, lse_partials_kernel  # noqa: E402
from tools.kernel_analysis.ptxas_check import SHARED_LIMIT, compile_kernel, resource_usage, signature  # noqa: E402
from tools.kernel_analysis.tensor_cores import mma_work  # noqa: E402

DIRECTION_SETS, JOINT_ONLY_SETS = list(plan.DIRECTION_SETS), list(plan.JOINT_ONLY_SETS)
DTYPES = {"bf16": ("*bf16", 2), "fp16": ("*fp16", 2), "fp32": ("*fp32", 4)}
ARCHS = (90, 80, 89)
EMBEDDINGS = {"X", "Q", "D", "NEG", "POS_ROWS"}  # in the input dtype; OUT too for the epilogue
FLOAT32 = {
    "SCALE",
    "LSE",
    "ROW_LSE",
    "ROW_W",
    "Q_LSE",
    "Q_W",
    "D_LSE",
    "D_W",
    "X_INV_NORMS",
    "Q_INV_NORMS",
    "D_INV_NORMS",
    "NEG_INV_NORMS",
    "POS_INV_NORMS",
    "BUF",
    "POS_COEF",
    "FACTOR",
    "DOTS_OUT",
    "S",
    "ROW_PART",
    "COL_PART",
    "COL_LSE",
    "COL_W",
    "THRESHOLDS",
    "ROW_NORM",
    "COL_NORM",
    "ROW_DOTS",
    "COL_DOTS",
}
# Int arguments never specialised as multiples of 16: the hard negatives' and Matryoshka prefixes'
# counts, and the row strides of the inverse prefix norms [rows, K] (K often 3 to 6).
UNALIGNED = {"n_hard", "n_prefixes", "stride_row_norm", "stride_col_norm"}
LAST_STRIDES = {
    "stride_s_col",
    "stride_g_col",
    "stride_x_dim",
    "stride_q_dim",
    "stride_d_dim",
    "stride_neg_dim",
    "stride_out_dim",
    "stride_buf_dim",
    "stride_pos_dim",
}
KERNELS = {
    "lse_kernel": K.lse_kernel.fn,
    "grad_kernel": K.grad_kernel.fn,
    "epilogue_kernel": epilogue_kernel,
    "lse_partials_kernel": lse_partials_kernel,
    "coefficient_kernel": coefficient_kernel,
}


def types(dtype: str) -> dict:
    ptr = DTYPES[dtype][0]
    out = {name: "*fp32" for name in FLOAT32}
    out.update({name: ptr for name in EMBEDDINGS}, GROUP_IDS="*i64")
    out["OUT"] = out["G"] = ptr  # the gradient and the hybrid path's coefficients, in the input dtype
    out["hardness"] = "fp32"  # a Python float at run time
    return out


HARDNESS = [None, "hard_negatives", "all_negatives"]  # between them, every penalty bit pattern


def variants(everything: bool = True):
    """(kernel name, flags) of every launch ``ops`` can make, without repeats: NORMED both ways and
    every hardness mode, with and without hard negatives, or (``everything=False``) NORMED with group
    ids and not without, and one hardness mode per direction set and hard negatives or not in
    rotation, so that every flag takes each of its values."""
    seen = []
    combos = itertools.product(
        enumerate(DIRECTION_SETS + JOINT_ONLY_SETS),
        [False, True],
        [False, True],
        HARDNESS,
        [True, False],
        [False, True],
    )
    for (i, directions), groups, normed, hardness, has_hard, margin in combos:
        if not everything and (
            normed != groups
            or hardness != HARDNESS[(i + groups) % len(HARDNESS)]
            or has_hard != ((i + groups) % 2 == 0)
            or margin != ((i + groups) % 3 == 1)
        ):
            continue
        launches = [(K.lse_kernel, launch) for launch in plan.forward_launches(directions)]
        launches += [
            (K.grad_kernel, launch)
            for shared in (True, False)
            for launch in plan.backward_launches(directions, shared)
            if launch.walks
        ]
        for kernel, launch, dots in [(k, la, dots) for k, la in launches for dots in (False, True)]:
            if not everything and dots != (i % 2 == 0):
                continue
            flags = launch.roles(groups, hardness, has_hard, margin)
            if kernel is K.grad_kernel:
                flags["FINISH"] = launch.finish(normed, dots)
            item = (kernel.fn.__name__, {**flags, "NORMED": normed})
            if item not in seen:
                seen.append(item)
                yield item
    for has_partner, normed, dots in itertools.product([False, True], repeat=3):
        yield "epilogue_kernel", dict(HAS_PARTNER=has_partner, NORMED=normed, DOTS_WANTED=dots)


def hybrid_variants():
    """(kernel name, flags) of the hybrid path's epilogues: every role a tile of it takes, forward
    (``lse_partials_kernel``) and backward (``coefficient_kernel``), without repeats."""
    seen = []
    for directions, shared, groups, hardness, margin in itertools.product(
        DIRECTION_SETS + JOINT_ONLY_SETS, [True, False], [False, True], HARDNESS, [False, True]
    ):
        for x, seg, role in hybrid.pairs(directions, shared, groups, hardness, True, margin):
            for item in (
                ("lse_partials_kernel", {"ROLE": hybrid.forward_role(x, seg, role), "NORMED": False}),
                ("coefficient_kernel", {"ROLE": role, "PREFIXED": False, "NORMED": False}),
            ):
                if item not in seen:
                    seen.append(item)
                    yield item
    # Matryoshka in one pass (the prefixes' backward at ``hybrid.PREFIX_TILE``): the heaviest tile's
    # roles, each prefix normalised by its own norms or not
    x, seg, role = hybrid.pairs(DIRECTION_SETS[-1], True, True, "all_negatives", True, True)[0]
    yield "lse_partials_kernel", {"ROLE": hybrid.forward_role(x, seg, role), "NORMED": True}
    for normed in (False, True):
        yield "coefficient_kernel", {"ROLE": role, "PREFIXED": True, "NORMED": normed, "PREFIX_TILE": True}


def heaviest_backward(normed: bool = False, margin: bool = False) -> dict:
    """The queries' launch of bidirectional SamToNe (every walk, both roles) with groups and the
    hardness penalty; without ``normed`` its last sweep writes the gradient, the positive logit's
    term and the dots (``plan.Launch.finish``)."""
    launch = plan.backward_launches(DIRECTION_SETS[-1], shared=True)[0]
    return {
        **launch.roles(True, "all_negatives", True, margin),
        "FINISH": launch.finish(normed, True),
        "NORMED": normed,
    }


def heaviest_forward() -> dict:
    launch = plan.forward_launches(DIRECTION_SETS[-1])[0]  # queries: every segment
    return {**launch.roles(True, "all_negatives"), "NORMED": True}


def precisions(dtype: str):
    return ("ieee", "tf32") if dtype == "fp32" else ("tf32",)  # ignored by tl.dot for 16-bit inputs


def job(name, flags, dtype, tile, arch, contiguous, precision):
    """Compile one kernel; return a printable line and the failures it found."""
    start = time.perf_counter()
    fn = KERNELS[name]
    bm, bn, bd, warps, stages, paired, span, resident, maxnreg, transposed = C.full_tile(tile)
    epilogue = fn in (epilogue_kernel, lse_partials_kernel, coefficient_kernel)
    constexprs = dict(flags)
    if fn is epilogue_kernel:
        constexprs.update(BLOCK_R=16, BLOCK_D=128)
        warps, stages = 4, 1
    elif epilogue:  # the hybrid path's, at their fixed tile
        fixed = hybrid.PREFIX_TILE if flags.get("PREFIX_TILE") else hybrid.EPILOGUE_TILE
        constexprs.update(BLOCK_M=fixed["BLOCK_M"], BLOCK_N=fixed["BLOCK_N"])
        warps, stages = fixed["num_warps"], 1
    else:
        constexprs.update(
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_D=bd,
            PRECISION=precision,
            PAIRED=bool(paired),
            SPAN=span,
            RESIDENT=resident,
            TRANSPOSED=bool(transposed),
        )
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    sig = signature(fn, constexprs, types(dtype))
    spec = {}
    if contiguous:
        ints = [name for name, ty in sig.items() if ty == "i32"]
        spec = dict(
            unit={n for n in ints if n in LAST_STRIDES},
            divisible={n for n, ty in sig.items() if ty.startswith("*")}
            | {n for n in ints if n not in LAST_STRIDES and n not in UNALIGNED},
        )
    maxnreg = None if epilogue else maxnreg or None  # (0 in a --sweep tile: no cap)
    compiled = compile_kernel(
        fn, sig, constexprs, arch=arch, num_warps=warps, num_stages=stages, maxnreg=maxnreg, **spec
    )
    use = resource_usage(compiled, arch)
    failures = []
    label = (
        f"sm_{arch} {fn.__name__:<15} {dtype} {precision if dtype == 'fp32' else ''} {tile} "
        f"{'contiguous' if contiguous else 'strided'} {flags}"
    )
    if not epilogue:
        bound = C.shared_bytes(bm, bn, bd, stages, DTYPES[dtype][1], bool(paired), span, resident)
        if use["shared"] > bound:
            failures.append(f"{label}: shared {use['shared']} B > the prune's bound {bound} B")
        if bound <= SHARED_LIMIT[arch] < use["shared"]:
            failures.append(f"{label}: kept by the prune but {use['shared']} B > sm_{arch}'s {SHARED_LIMIT[arch]} B")
    if contiguous and dtype != "fp32" and use["spill_stores"]:
        failures.append(f"{label}: {use['spill_stores']} B of register spills")
    dots = mma_work(compiled.asm["ttgir"], warps)
    for d in dots:
        if d["issued"] > d["useful"]:
            failures.append(
                f"{label}: a {'x'.join(map(str, d['tile']))} dot laid out warpsPerCTA={list(d['warps'])} issues "
                f"{d['issued']} tensor-core instructions where {d['useful']} do its work"
            )
    issued, useful = sum(d["issued"] for d in dots), sum(d["useful"] for d in dots)
    line = (
        f"{label}: {use['registers']} regs, spills {use['spill_stores']}/{use['spill_loads']} B, "
        f"shared {use['shared']} B, MMA issued/useful {issued}/{useful} ({time.perf_counter() - start:.1f} s)"
    )
    return line, failures


def margin_of(fn: str, flags: dict) -> bool:
    """Whether a launch of the fused kernels has the false-negative margin: it runs on sm_90 and
    newer only (``configs.MARGIN_MIN_ARCH``; older GPUs compute those calls by the hybrid path)."""
    return fn in ("lse_kernel", "grad_kernel") and any(flags.get(f"{seg}_ROLE", 0) & plan.DROP_MARGIN for seg in "QDN")


def jobs(everything: bool):
    if everything:
        for (fn, flags), dtype, arch, contiguous in itertools.product(variants(), DTYPES, ARCHS, [True, False]):
            if margin_of(fn, flags) and arch < C.MARGIN_MIN_ARCH:
                continue  # the hybrid path computes those calls there
            for tile, precision in itertools.product(C.tiles_for(arch, fn == "grad_kernel"), precisions(dtype)):
                yield fn, flags, dtype, tile, arch, contiguous, precision
        for (fn, flags), dtype, arch in itertools.product(hybrid_variants(), DTYPES, ARCHS):
            yield fn, flags, dtype, C.tiles_for(arch)[0], arch, True, "tf32"
        return
    combos = [("bf16", "tf32"), ("fp16", "tf32"), ("fp32", "tf32")]
    for i, (fn, flags) in enumerate(variants(everything=False)):
        dtype, precision = combos[i % len(combos)]
        arch = ARCHS[i % len(ARCHS)]
        if margin_of(fn, flags) and arch < C.MARGIN_MIN_ARCH:
            arch = C.MARGIN_MIN_ARCH  # the hybrid path computes those calls on older GPUs
        tiles = C.tiles_for(arch, fn == "grad_kernel")
        yield fn, flags, dtype, tiles[(i // len(ARCHS)) % len(tiles)], arch, True, precision
    for i, (fn, flags) in enumerate(hybrid_variants()):  # the hybrid path's epilogues: dtypes and archs in rotation
        dtype, arch = list(DTYPES)[i % len(DTYPES)], ARCHS[(i // len(DTYPES)) % len(ARCHS)]
        yield fn, flags, dtype, C.tiles_for(arch)[0], arch, True, "tf32"  # (their own tile, fixed)
    for arch in ARCHS:  # every config the autotuner may pick there, for the heaviest launches, bf16
        for tile, normed, margin in itertools.product(C.tiles_for(arch), (False, True), (False, True)):
            if not margin or arch >= C.MARGIN_MIN_ARCH:
                yield "grad_kernel", heaviest_backward(normed, margin), "bf16", tile, arch, True, "tf32"
    for arch in ARCHS:  # strided inputs (no unit strides): it must compile, and fit the prune's bound
        for tile in _swept_and_resident(arch):
            yield "grad_kernel", heaviest_backward(), "bf16", tile, arch, False, "tf32"
    for arch in ARCHS:  # float32 at torch's default precision
        for tile in _swept_and_resident(arch):
            yield "grad_kernel", heaviest_backward(), "fp32", tile, arch, True, "ieee"
        yield "lse_kernel", heaviest_forward(), "fp32", C.tiles_for(arch, False)[-1], arch, True, "ieee"


def _swept_and_resident(arch: int) -> list:
    """The backward's first swept config on ``arch`` and its widest resident one, if it has one."""
    tiles = C.tiles_for(arch)
    resident = [t for t in tiles if C.full_tile(t)[7]]
    return [tiles[0]] + resident[-1:]


def _run(args):
    try:
        return job(*args)
    except Exception as e:  # report and go on: one broken variant should not hide the others
        return f"{args}: {type(e).__name__}: {e}", [f"{args}: {type(e).__name__}: {e}"]


def sweep(archs, tiles):
    """Every variant (``variants(everything=False)``, no epilogue) and the heaviest backward ones
    (their last sweep's finish; the margin where the architecture takes it) x the given tiles x
    architectures, bfloat16, contiguous: the spill tables of bench/RESULTS.md."""
    for arch, tile in itertools.product(archs, tiles):
        for fn, flags in variants(everything=False):
            if fn == "grad_kernel" or (fn == "lse_kernel" and not C.full_tile(tile)[7]):  # (resident: backward only)
                yield fn, flags, "bf16", tile, arch, True, "tf32"
        for normed, margin in itertools.product((False, True), (False, True)):
            if not margin or arch >= C.MARGIN_MIN_ARCH:
                yield "grad_kernel", heaviest_backward(normed, margin), "bf16", tile, arch, True, "tf32"


def main() -> int:
    everything = "--all" in sys.argv
    # --sweep ARCH[,ARCH] TILE [TILE ...], a tile as BM,BN,BD,WARPS,STAGES and optionally
    # ,PAIRED,SPAN[,RESIDENT[,MAXNREG[,TRANSPOSED]]]
    if "--sweep" in sys.argv:
        args = sys.argv[sys.argv.index("--sweep") + 1 :]
        archs = [int(a) for a in args[0].split(",")]
        work = list(sweep(archs, [tuple(int(v) for v in t.split(",")) for t in args[1:]]))
    else:
        work = list(jobs(everything))
    failures = []
    with Pool(int(os.environ.get("COMPILE_WORKERS", "2"))) as pool:
        for line, failed in pool.imap(_run, work):
            print(line, flush=True)
            failures += failed
    print(f"compiled {len(work)} kernels, {len(failures)} failures")
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
