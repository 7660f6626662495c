"""The fused kernels' autotuning: the configs offered per GPU architecture, the bound on a config's
shared memory, and the prune that drops configs a problem or a device cannot use.

The tuning key holds every flag (each variant tunes its own tiles), the dtype, D, H and the batch
sizes rounded up to a power of two (``bucket``), so a new batch size within the bucket (an epoch's
short last batch) reuses the tuned tiles. Configs whose shared memory would exceed the running
device's limit are pruned before they compile (``shared_bytes`` bounds it; the GPU compile check tests
that bound). ``SAMTONE_TRITON_CONFIG="BLOCK_M,BLOCK_N,BLOCK_D,num_warps,num_stages"`` pins one config
(no tuning); ``",PAIRED,SPAN[,RESIDENT[,MAXNREG[,TRANSPOSED]]]"`` appended, its walk too.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from .._constants import interpreting

INTERPRETING = interpreting()  # read once: the configs below are fixed when the kernels are defined

#: Configs the autotuner chooses from on a GPU, by architecture: (BLOCK_M, BLOCK_N, BLOCK_D, num_warps,
#: num_stages, PAIRED, SPAN). PAIRED: the Q and D segments are walked together (their two logit tiles
#: from one load of the row tile); SPAN: column tiles of a lone segment per sweep over D in the
#: backward (a paired walk stages its two tiles). Kept: those whose every launch variant compiles
#: without register spills in bfloat16 (``tools/kernel_analysis/compile_for_gpu.py --sweep``; the
#: figures are in bench/RESULTS.md): on sm_90 the paired walk at 64 x 64; on sm_80 / sm_89 (no wgmma:
#: the dot operands live in registers) each segment alone, one tile per sweep, at 64 x 128. The prune
#: also drops what shared memory cannot hold.
GPU_TILES = {
    90: ((64, 64, 64, 8, 3, True, 2),),
    80: ((64, 128, 64, 8, 3, False, 1),),
}

#: The swept backward with its products transposed (``sweeps.sweep``, TRANSPOSED: ``BUF^T += Y^T
#: coef^T``), offered beside GPU_TILES' on sm_90 for the autotuner to time, at the same tile. There
#: wgmma reads its B operand from shared memory as it is, while an A operand goes through registers:
#: as the A operand (the plain walk) each staged coefficient tile is reloaded from shared memory per
#: chunk of D, as the B operand it is not. Compiled (the heaviest backward, triton 3.9): the same
#: wgmma count, no ``ldmatrix`` (46 in the plain walk), registers within 7 of it, more shared-memory
#: loads and stores for the transposes. Which is faster only a GPU can say.
TRANSPOSED_TILES = {90: ((64, 64, 64, 8, 3, True, 2),)}

#: The RESIDENT backward's tiles (``sweeps.resident_walk``: D within one BLOCK_D, the rows' tile and
#: their float32 gradient on chip across all column tiles, each candidate tile loaded once), offered
#: beside GPU_TILES' for the autotuner to time: (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages[,
#: MAXNREG]), one per power of two of D. Each segment walks alone (with X resident, pairing saves no
#: load). The logits' dot feeds the coefficients' dot, and Triton lays such a chain's first dot out
#: with every warp along M: on sm_90 128 rows for 8 warps; on sm_80 / sm_89 32 rows take 4 warps
#: (with 8, or at 32 x 16, warps repeat each other's tensor-core work; the compile check fails it).
#: MAXNREG is the PTX register cap (``.maxnreg``). Without one, ptxas aims at more resident warps and
#: spills a few bytes in the 32-row tiles' heaviest variants (8-40 B at 96-255 registers, e.g. 8 B at
#: 96 on sm_89 for D <= 64); with one it uses what it needs up to the cap. Each cap is the lowest of
#: 128 / 168 / 255 (4 / 3 / 2 CTAs of 128 threads an SM) at which nothing spills.
#: Kept: every launch variant compiles without spills in 16-bit with triton 3.6 and 3.9 (the
#: compile check's heaviest variants, with the last sweep's finish, included):
#: - sm_90, D <= 128: 128 rows, 8 warps (the heaviest variant, with the margin, spilled at 128 x 64 x
#:   128). D <= 256: 32 x 32, 4 warps, 1 stage, cap 255 (with 2 stages the heaviest variant with the
#:   margin spilled 8 B at 255 registers; at cap 168, 12-88 B; 128 x 32 with 8 warps spilled 320 B,
#:   64 x 32 with 4 warps 324-420 B: the float32 rows alone take 128 registers a thread there).
#: - sm_80 / sm_89 (no margin variants there: ``MARGIN_MIN_ARCH``), keyed by the exact architecture
#:   (sm_86, compiled by nobody here, gets none): 32 x 32 and 4 warps for each D, 1 stage for D <= 64
#:   (sm_89: cap 128), 2 stages and cap 168 for D <= 128, cap 255 for D <= 256 (1 stage at D = 128
#:   uses more shared memory than 2). With 64 rows some variant spilled (4-16 B at 64 x 32 x 64 and
#:   64 x 16 x 64, 4 warps; 12 B at 64 x 32 x 128, 4 warps; 4-16 B in six variants at 64 x 64 x 128,
#:   8 warps; all without a cap).
#: Modelled (``traffic_model``), the 32-row walk moves 0.53-0.59 of sm_80's swept walk's bytes at
#: N = 16384 (0.67-0.77 at N = 256), at any D.
RESIDENT_TILES = {
    90: ((128, 64, 64, 8, 2), (128, 32, 128, 8, 2), (32, 32, 256, 4, 1, 255)),
    80: ((32, 32, 64, 4, 1), (32, 32, 128, 4, 2, 168), (32, 32, 256, 4, 2, 255)),
    89: ((32, 32, 64, 4, 1, 128), (32, 32, 128, 4, 2, 168), (32, 32, 256, 4, 2, 255)),
}


#: The oldest architecture on which the fused kernel takes the false-negative margin. Its backward's
#: two per-role threshold tests need more registers than sm_80 / sm_89 give the offered configs
#: without spilling (triton 3.6, ``ptxas``), so there ``backend="triton"`` computes a call with a
#: margin by the hybrid path (``ops.row_stats_triton``); the compile check compiles those variants
#: for sm_90 only.
MARGIN_MIN_ARCH = 90


#: The walk of a config that does not name one (PAIRED, SPAN): the kernels' defaults.
DEFAULT_WALK = (True, 2)


def full_tile(tile: tuple) -> tuple:
    """A config tuple with every field: (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages, PAIRED,
    SPAN, RESIDENT, MAXNREG, TRANSPOSED), the walk's fields defaulted (``DEFAULT_WALK``, not
    resident, no register cap: None, not transposed)."""
    return tuple(tile) + (*DEFAULT_WALK, False, None, False)[len(tile) - 5 :]


def tiles_for(arch: int, grad: bool = True) -> tuple:
    """The GPU configs offered on compute capability ``arch`` (90, 80, 89, ...): for ``grad_kernel``
    (``grad``) with the transposed and the resident ones (all ``full_tile``'s fields), for
    ``lse_kernel`` without."""
    key = 90 if arch >= 90 else 80
    offered = RESIDENT_TILES.get(90 if arch >= 90 else arch, ())  # by the exact architecture below sm_90
    resident = tuple(full_tile((*t[:5], False, 1, True, *t[5:6])) for t in offered) if grad else ()
    transposed = tuple(full_tile(t)[:9] + (True,) for t in TRANSPOSED_TILES.get(key, ())) if grad else ()
    return GPU_TILES[key] + transposed + resident


#: Under the interpreter every program runs in NumPy: the smallest legal tiles, one config.
INTERPRETER_TILES = ((16, 16, 16, 4, 1, *DEFAULT_WALK),)


def _config(
    bm: int,
    bn: int,
    bd: int,
    warps: int,
    stages: int,
    paired: bool = DEFAULT_WALK[0],
    span: int = DEFAULT_WALK[1],
    resident: bool = False,
    maxnreg: int | None = None,
    transposed: bool = False,
    grad: bool = True,
) -> triton.Config:
    kwargs = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "PAIRED": bool(paired)}
    if grad:
        kwargs.update(SPAN=span, RESIDENT=bool(resident), TRANSPOSED=bool(transposed))
    return triton.Config(kwargs, num_warps=warps, num_stages=stages, maxnreg=maxnreg if grad else None)


def running_arch() -> int | None:
    """Compute capability (90, 80, ...) of the current CUDA device, None without one. Read when the
    kernels are defined, which happens only when the Triton backend first runs (never at package
    import)."""
    if INTERPRETING or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def configs(grad: bool, arch: int | None = None) -> list[triton.Config]:
    """The autotuner's configs for ``grad_kernel`` (``grad``) or ``lse_kernel`` (no SPAN): those of
    the GPU architecture ``arch`` (the running one's when the kernels are defined), so that where it
    is offered one config the autotuner never benchmarks (triton 3.6 benchmarks even a pruned list
    of one); every architecture's without a GPU."""
    pinned = os.environ.get("SAMTONE_TRITON_CONFIG")
    if pinned:
        values = [int(v) for v in pinned.split(",")]
        if (
            len(values) not in (5, 7, 8, 9, 10)
            or (len(values) >= 7 and (values[5] not in (0, 1) or values[6] not in (1, 2)))
            or (len(values) >= 8 and values[7] not in (0, 1))
            or (len(values) >= 9 and not (values[8] == 0 or 24 <= values[8] <= 255))
            or (len(values) == 10 and (values[9] not in (0, 1) or values[7] and values[9]))
        ):
            raise ValueError(
                "SAMTONE_TRITON_CONFIG: expected 'BLOCK_M,BLOCK_N,BLOCK_D,num_warps,num_stages' and "
                "optionally ',PAIRED,SPAN[,RESIDENT[,MAXNREG[,TRANSPOSED]]]' (0 or 1, 1 or 2, 0 or 1, 0 for "
                f"no register cap or 24-255, 0 or 1 where not resident), got {pinned!r}"
            )
        bm, bn, bd, warps, stages, paired, span, resident, maxnreg, transposed = full_tile(tuple(values))
        walk = dict(resident=grad and bool(resident), maxnreg=maxnreg or None, transposed=grad and bool(transposed))
        return [_config(bm, bn, bd, warps, stages, paired, span, **walk, grad=grad)]
    if INTERPRETING:
        tiles = INTERPRETER_TILES
    elif arch is not None:
        tiles = tiles_for(arch, grad)
    else:
        tiles = tuple(dict.fromkeys(t for a in (*GPU_TILES, *RESIDENT_TILES) for t in tiles_for(a, grad)))
    return [_config(*t, grad=grad) for t in tiles]


def shared_bytes(
    block_m: int,
    block_n: int,
    block_d: int,
    num_stages: int,
    itemsize: int,
    paired: bool = DEFAULT_WALK[0],
    span: int = DEFAULT_WALK[1],
    resident: bool = False,
) -> int:
    """An upper bound on a config's shared memory: the larger of the pipelined K-loop (a chunk of X
    and of one candidate tile, or two when ``paired``) and the backward's sweep over D (its staged
    coefficient tiles, two when paired or ``span`` = 2, and the pipelined chunks of their candidates),
    plus one tile for layout conversions and a few row vectors for reductions; ``resident``: the
    rows' whole tile, the candidate tiles' ring (two tiles at least: unpipelined, the tile is held in
    both operand layouts) and the logits' float32 tile (the GPU compile check holds the compiled
    kernels to it on sm_80, sm_89 and sm_90)."""
    if resident:
        ring = max(num_stages, 2) * block_n
        return (block_m + ring) * block_d * itemsize + block_m * block_n * 4 + 4 * (block_m + block_n) * 4
    staged = 2 if paired or span == 2 else 1
    k_loop = num_stages * (block_m + (1 + paired) * block_n) * block_d * itemsize
    sweep = staged * (block_m * block_n + num_stages * block_n * block_d) * itemsize
    return max(k_loop, sweep) + block_m * block_n * itemsize + 4 * (block_m + block_n) * 4


@functools.cache
def _device(device_index: int) -> tuple[int | None, int | None]:
    """(compute capability as 90, 80, ..., shared memory per block) of a CUDA device."""
    if INTERPRETING or not torch.cuda.is_available():
        return None, None
    props = torch.cuda.get_device_properties(device_index)
    return 10 * props.major + props.minor, getattr(props, "shared_memory_per_block_optin", None)


def _fits(c: triton.Config, dim: int) -> bool:
    """A resident config computes only the first BLOCK_D columns of D: it serves D <= BLOCK_D alone."""
    return not c.kwargs.get("RESIDENT", False) or dim <= c.kwargs["BLOCK_D"]


def check_fits(configs: list[triton.Config], dim: int) -> None:
    """Raise where no config can serve D: a resident config narrower than D alone (pinned by
    ``SAMTONE_TRITON_CONFIG``, or a list a test set), which the autotuner would run unpruned."""
    if not any(_fits(c, dim) for c in configs):
        raise ValueError(
            f"a resident config (BLOCK_D = {configs[0].kwargs['BLOCK_D']}) cannot serve D = {dim}: it needs "
            "BLOCK_D >= D (SAMTONE_TRITON_CONFIG pins one)"
        )


def usable_resident(c: triton.Config, dim: int, n_rows: int) -> bool:
    """A resident config the prune would keep for D and this many rows (``grad_launcher`` offers
    the autotuner the resident configs only where one is)."""
    return (
        c.kwargs.get("RESIDENT", False)
        and dim <= c.kwargs["BLOCK_D"] <= max(16, triton.next_power_of_2(dim))
        and c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(n_rows))
    )


def _tile_of(c: triton.Config, grad: bool) -> tuple:
    """A config as ``full_tile`` writes the tuples of ``tiles_for`` (the forward's: no sweep)."""
    k = c.kwargs
    span = k.get("SPAN", DEFAULT_WALK[1]) if grad else DEFAULT_WALK[1]
    resident = k.get("RESIDENT", False) if grad else False
    return (
        k["BLOCK_M"],
        k["BLOCK_N"],
        k["BLOCK_D"],
        c.num_warps,
        c.num_stages,
        k.get("PAIRED", DEFAULT_WALK[0]),
        span,
        resident,
        c.maxnreg if grad else None,
        k.get("TRANSPOSED", False) if grad else False,
    )


def _allowed(c: triton.Config, grad: bool, arch: int | None, limit: int | None, itemsize: int) -> bool:
    """Offered to the device's architecture (``tiles_for``; the forward's walk fields unchecked)
    and within its shared memory."""
    tile = _tile_of(c, grad)
    if arch is not None:
        offered = [full_tile(t) for t in tiles_for(arch, grad)]
        if (tile if grad else tile[:6]) not in [(t if grad else t[:6]) for t in offered]:
            return False
    bm, bn, bd, _, stages, paired, span, resident, _, _ = tile
    return limit is None or shared_bytes(bm, bn, bd, stages, itemsize, paired, span if grad else 1, resident) <= limit


def _prune(configs, named_args, **kwargs):
    """Drop resident tiles narrower than D, tiles much larger than the problem, those the device's
    architecture does not get (``tiles_for``), and those over its shared memory. Where that leaves
    nothing (a problem smaller than every tile), the narrowest in D, then smallest, of those that
    serve D on the device."""
    args = {**named_args, **kwargs}
    n_rows, n_cols, dim = args["n_rows"], args["n_cols"], args["dim"]
    x, grad = args["X"], "BUF" in args  # grad_kernel's or lse_kernel's arguments
    arch, limit = _device(x.device.index or 0) if x.device.type == "cuda" else (None, None)
    serve = [c for c in configs if _fits(c, dim) and _allowed(c, grad, arch, limit, x.element_size())]
    fit = max(16, triton.next_power_of_2(dim))
    kept = [
        c
        for c in serve
        if c.kwargs["BLOCK_D"] <= fit
        and c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(n_rows))
        and c.kwargs["BLOCK_N"] <= max(16, triton.next_power_of_2(n_cols))
    ]
    if kept:
        return kept
    fallback = serve or [c for c in configs if _fits(c, dim)]
    return [
        min(fallback, key=lambda c: (c.kwargs["BLOCK_D"], c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.num_stages))
    ]


def bucket(n: int) -> int:
    """Batch sizes share tuned tiles within a power of two."""
    return triton.next_power_of_2(max(int(n), 1))


#: The constexprs every launch variant tunes apart (beside the sizes in the key).
FLAGS = ["Q_ROLE", "D_ROLE", "N_ROLE", "NORMED", "PRECISION"]
AUTOTUNE = dict(prune_configs_by={"early_config_prune": _prune})
