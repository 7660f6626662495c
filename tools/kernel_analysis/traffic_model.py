"""A model of the bytes the fused kernels load and store, tile by tile, for the design they have and for
the designs that would move less: arithmetic, not a count and not a timing.

``tests/test_kernel_work.py`` holds the model of today's design to within 2% of what the interpreter
counts (``counting.py``), launch by launch; the other designs are the same arithmetic with one term
changed, so that a choice between them can be argued before a GPU weighs their register and shared
memory cost (bench/RESULTS.md). The launches, their walks and roles come from ``plan``.

Per program of BM rows, against column tiles of BN pairs, at dimension D and element size e:
``row`` = BM D e (the row tile X), ``col`` = BN D e (a candidate tile Y), ``f32`` = BM D 4 (the
program's float32 gradient rows). Left out or simplified, so the model holds where the test checks
it: the vectors loaded per tile (statistics, inverse norms, group ids: about 8 / (D e) of the Y term,
0.5% at D = 768); tiles are charged whole, so N must be a multiple of BM and BN (the kernels load
only the rows inside the mask); the epilogue makes one pass, as it does with ``normalize=False`` and
no temperature gradient (otherwise it reads its inputs twice).

    python -m tools.kernel_analysis.traffic_model      # the table of bench/RESULTS.md: bytes per textbook FLOP
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from samtone_kernels import _plan as plan


@dataclass(frozen=True)
class Design:
    """``paired``: a launch walks the column tiles of its Q and D segments together (one load of the
    row tile X for both logit tiles). ``tiles_per_sweep``: coefficient tiles held on chip per sweep
    over D, one read-modify-write of the float32 gradient rows for all of them (a paired walk's two
    tiles; two column tiles of a lone segment). ``fused_epilogue``: the last sweep writes the gradient
    in the input dtype (adding the positive logit's term), so no epilogue launch reads the buffer
    back. ``resident_x``: the row tile is loaded once per program (BM x D on chip).
    ``accumulator_on_chip``: the BM x D float32 gradient rows never leave the chip.
    ``resident_backward``: the grad kernel's RESIDENT walk (D within one tile): in the backward only,
    the row tile loaded once, each candidate tile once for both its logits and its ``G Y``, the
    float32 rows on chip, the gradient written at the end (the forward as the other fields say)."""

    paired: bool = False
    tiles_per_sweep: int = 1
    fused_epilogue: bool = False
    resident_x: bool = False
    accumulator_on_chip: bool = False
    resident_backward: bool = False


V2 = Design()  # kernel v2 (2026-11-29): a tile per segment, a read-modify-write per tile, an epilogue launch
TODAY = Design(paired=True, tiles_per_sweep=2, fused_epilogue=True)
RESIDENT = Design(paired=True, tiles_per_sweep=2, fused_epilogue=True, resident_backward=True)  # D <= 128


def _groups(segments: list[str], n_hard: int, paired: bool) -> list[list[str]]:
    """The segments a program walks in one column-tile loop: each alone, or Q with D when paired;
    hard negatives each on its own (one block per k)."""
    plain = [s for s in segments if s != "n"]
    groups = [plain] if paired and len(plain) == 2 else [[s] for s in plain]
    return groups + [["n"]] * (n_hard if "n" in segments else 0)


def _program(segments, n_hard, col_tiles, row, col, f32, design, backward, partner):
    """Bytes one program loads and stores."""
    groups = _groups(segments, n_hard, design.paired)
    steps = len(groups) * col_tiles  # column tiles, each loading X once for its group's logit tiles
    y_tiles = sum(len(g) for g in groups) * col_tiles
    x_loads = row if design.resident_x else steps * row
    if not backward:
        return x_loads + y_tiles * col
    if design.resident_backward:  # X once, each Y tile once, then the gradient (and the partner)
        steps = sum(len(g) for g in _groups(segments, n_hard, False)) * col_tiles
        return row + steps * col + (row + row * partner if design.fused_epilogue else f32)
    total = x_loads + 2 * y_tiles * col  # Y for the recompute and again for G Y
    sweeps = sum(math.ceil(col_tiles / max(1, design.tiles_per_sweep // len(g))) for g in groups)
    if design.accumulator_on_chip:
        round_trips = 0
    else:
        round_trips = 2 * sweeps - 1  # the first sweep stores, the others read and store
    total += round_trips * f32
    if design.fused_epilogue:  # the last sweep writes the gradient (and reads the partner) instead
        total += -f32 * (not design.accumulator_on_chip) + row + row * partner
    elif design.accumulator_on_chip:
        total += f32  # the buffer the epilogue reads
    return total


def bytes_by_kernel(
    directions, n_pairs: int, dim: int, n_hard: int, itemsize: int, block_m: int, block_n: int, design: Design = TODAY
) -> dict[str, int]:
    """Modelled bytes of one forward + backward, by kernel (the candidates being the anchors)."""
    row, col, f32 = block_m * dim * itemsize, block_n * dim * itemsize, block_m * dim * 4
    row_tiles, col_tiles = math.ceil(n_pairs / block_m), math.ceil(n_pairs / block_n)
    out = {"lse_kernel": 0, "grad_kernel": 0, "epilogue_kernel": 0}
    for launch in plan.forward_launches(directions):
        out["lse_kernel"] += row_tiles * _program(
            list(launch.walks), n_hard, col_tiles, row, col, f32, design, False, False
        )
    for launch in plan.backward_launches(directions, shared=True):
        blocks = n_hard if launch.rows == "n" else 1
        partner = launch.rows in ("q", "d")
        if launch.walks:
            out["grad_kernel"] += (
                blocks
                * row_tiles
                * _program(list(launch.walks), n_hard, col_tiles, row, col, f32, design, True, partner)
            )
        if not design.fused_epilogue or not launch.walks:
            # the float32 buffer (when a walk made one), the partner's rows, the gradient out
            out["epilogue_kernel"] += blocks * row_tiles * ((f32 if launch.walks else 0) + row * partner + row)
    return out


def textbook_flops(directions, n_pairs: int, dim: int, n_hard: int) -> int:
    return sum(3 * 2 * n_pairs * n_pairs * dim * (n_hard if b.segment == "n" else 1) for b in plan.selected(directions))


CONFIGURATIONS = {
    "InfoNCE + 1 hard negative": (("q2d",), 1),
    "SamToNe": (("q2d", "q2q"), 0),
    "symmetric InfoNCE": (("q2d", "d2q"), 0),
    "bidirectional SamToNe": (("q2d", "q2q", "d2q", "d2d"), 0),
}
TARGETS = {
    "InfoNCE + 1 hard negative": 0.03,
    "SamToNe": 0.02,
    "symmetric InfoNCE": 0.02,
    "bidirectional SamToNe": 0.015,
}
DESIGNS = {
    "v2 (2026-11-29)": (V2, "one logit tile"),
    "paired Q and D": (Design(paired=True), "two logit tiles"),
    "fused epilogue": (Design(fused_epilogue=True), "one logit tile"),
    "today: paired, 2 tiles per sweep, fused": (TODAY, "two logit tiles, then two G tiles"),
    "... 4 tiles per sweep": (
        Design(paired=True, tiles_per_sweep=4, fused_epilogue=True),
        "two logit tiles, then four G tiles",
    ),
    "fused, accumulator on chip": (Design(fused_epilogue=True, accumulator_on_chip=True), "BM x D float32"),
    "fused, X resident, accumulator on chip": (
        Design(fused_epilogue=True, resident_x=True, accumulator_on_chip=True),
        "BM x D float32 and BM x D inputs",
    ),
}


def per_flop(directions, n_hard, design, n_pairs=256, dim=768, itemsize=2, block_m=128, block_n=128) -> float:
    """Modelled bytes per textbook FLOP of one forward + backward."""
    counted = bytes_by_kernel(directions, n_pairs, dim, n_hard, itemsize, block_m, block_n, design)
    return sum(counted.values()) / textbook_flops(directions, n_pairs, dim, n_hard)


def table(n_pairs: int = 256) -> str:
    names = list(CONFIGURATIONS)
    lines = [
        "| design | on chip beside the K-loop | " + " | ".join(names) + " |",
        "| --- | --- | " + " | ".join("---" for _ in names) + " |",
        "| issue target | | " + " | ".join(f"<= {TARGETS[n]}" for n in names) + " |",
    ]
    for label, (design, state) in DESIGNS.items():
        cells = [f"{per_flop(*CONFIGURATIONS[n], design, n_pairs=n_pairs):.4f}" for n in names]
        lines.append(f"| {label} | {state} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: The swept backward's tile and design, and the resident backward's rows and columns, by architecture
#: (``configs.GPU_TILES`` and ``RESIDENT_TILES``: sm_90 at D <= 128; sm_80 / sm_89 at each D).
RESIDENT_COMPARED = {90: ((64, 64, TODAY), (128, 32)), 80: ((64, 128, Design(fused_epilogue=True)), (32, 32))}


def resident_table(n_pairs: int, dim: int = 128, arch: int = 90) -> str:
    """Bytes per textbook FLOP, the forward at the swept tile in both; the backward swept or
    resident, at ``arch``'s tiles (``RESIDENT_COMPARED``)."""
    (block_m, block_n, design), (rows, cols) = RESIDENT_COMPARED[arch]
    lines = ["| configuration | swept backward | resident backward | ratio |", "| --- | --- | --- | --- |"]
    for name, (directions, n_hard) in CONFIGURATIONS.items():
        flops = textbook_flops(directions, n_pairs, dim, n_hard)
        swept_bytes = bytes_by_kernel(directions, n_pairs, dim, n_hard, 2, block_m, block_n, design)
        back = bytes_by_kernel(directions, n_pairs, dim, n_hard, 2, rows, cols, RESIDENT)
        swept = sum(swept_bytes.values())
        resident = swept_bytes["lse_kernel"] + back["grad_kernel"] + back["epilogue_kernel"]
        lines.append(f"| {name} | {swept / flops:.4f} | {resident / flops:.4f} | {resident / swept:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    for n in (256, 16384):
        print(f"bytes per textbook FLOP, float16, N = {n}, D = 768, 128 x 128 x 64 tiles (model)\n")
        print(table(n), "\n")
    for arch, n in itertools.product(RESIDENT_COMPARED, (256, 16384)):
        print(f"bytes per textbook FLOP, float16, N = {n}, D = 128, sm_{arch}'s configs (model)\n")
        print(resident_table(n, arch=arch), "\n")
