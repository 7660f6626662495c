"""Tensor-core work as compiled: every dot of a kernel's TTGIR, the MMA layout Triton gave it, and the
tensor-core instructions one CTA issues for it against those its tile needs.

Triton picks a dot's warp layout in its AccelerateMatmul pass. On sm_90 a dot whose result feeds
another dot (an accumulator chain, as in ``acc = dot(a0, y0, acc); acc = dot(a1, y1, acc)``) gets
all warps along M (``warpsPerCTA = [8, 1]``, the layout FlashAttention's chained dots want): on a
64-row tile with 8 warps both warpgroups then compute the same 64 rows, twice the wgmma for the same
product. ``compile_for_gpu`` fails a kernel with any dot that issues more than it needs. Needs no
GPU and no Triton: it reads text (``compiled.asm["ttgir"]``).
"""

from __future__ import annotations

import re

_MMA_LAYOUT = re.compile(
    r"^(#mma\d*) = #ttg\.nvidia_mma<\{versionMajor = (\d+), versionMinor = \d+, warpsPerCTA = \[(\d+), (\d+)\], "
    r"instrShape = \[(\d+), (\d+)(?:, (\d+))?\]",
    re.MULTILINE,
)
_DOT = re.compile(
    r"= (?:ttng\.warp_group_dot|tt\.dot) .*? : (?:tensor|!ttg\.memdesc)<(\d+)x(\d+)x(\w+),.*"
    r"-> tensor<(\d+)x(\d+)xf32, (#mma\d*)>"
)


def mma_work(ttgir: str, num_warps: int) -> list[dict]:
    """Every tensor-core dot of a kernel's TTGIR (``compiled.asm["ttgir"]``): its tile (M x N, depth
    K), the warps' layout over it, and how many tensor-core instructions one CTA issues for it
    (``issued``) against the ``useful`` count, the tile's work over one instruction's.

    A warp computes 16-row slabs of its MMA layout's ``instrShape`` (wgmma on sm_90: a warpgroup of 4
    warps issues one 64 x n x k instruction; mma.sync elsewhere: a warp issues 16 x 8 x k). When the
    warps along a dimension cover more than the tile (``warpsPerCTA = [8, 1]`` on 64 rows: two
    warpgroups of 64 rows each), the extra warps repeat the same product: issued > useful."""
    layouts = {
        m.group(1): (int(m.group(2)), (int(m.group(3)), int(m.group(4))), (int(m.group(5)), int(m.group(6))))
        for m in _MMA_LAYOUT.finditer(ttgir)
    }
    found = []
    for m in _DOT.finditer(ttgir):
        k, dtype = int(m.group(2)), m.group(3)
        rows, cols, layout = int(m.group(4)), int(m.group(5)), m.group(6)
        version, (wm, wn), (im, inn) = layouts[layout]
        ik = 8 if dtype == "f32" else 16  # tf32 takes k = 8, 16-bit inputs k = 16
        reps_m = -(-rows // (im * wm))  # each warp's repetitions along M and N (at least one)
        reps_n = -(-cols // (inn * wn))
        per_instr = (64 if version == 3 else 16) * inn * ik
        warps_per_issue = 4 if version == 3 else 1  # a wgmma is issued by a warpgroup
        issued = (num_warps // warps_per_issue) * reps_m * reps_n * (k // ik)
        found.append(
            dict(
                tile=(rows, cols, k),
                warps=(wm, wn),
                instr=(im, inn, ik),
                wgmma=version == 3,
                issued=issued,
                useful=rows * cols * k // per_instr,
            )
        )
    return found
