"""The one table that drives the kernels: which logit blocks the loss has, and from it which rows each
launch owns, which candidate segments it walks, in which role, with which entries removed.

Nothing here touches a tensor. The launchers (``ops.py``), the fake implementations and the GPU
compile check (``tests/compile_for_gpu.py``) all read the launches from ``forward_launches`` and
``backward_launches``; adding a direction means adding its rows to ``BLOCKS`` (and to the reference).

A *block* is one anchor kind against one candidate segment. A tile of the block's logits
``S = scale * X Y^T`` serves every block that has the same two tensors, in either order:

* as a **row** block, the tile's rows are anchors (X anchors, Y candidates): the gradient
  coefficient is ``w_i exp(S_ij - lse_i)`` with the row's statistics;
* as a **column** block, the tile's columns are anchors (Y anchors, X candidates; the logit
  ``s(y_j, x_i)`` is the same number): ``w_j exp(S_ij - lse_j)`` with the column's statistics.

A program owning rows of X sums both into one coefficient tile G and adds ``G Y`` to X's gradient
(derivation in the package docstring). With the candidates being the anchors themselves (no gathered
batch), every tensor's whole gradient comes from one launch that owns its rows, so no launch reads
what another wrote. Across devices a tile's transpose may belong to another rank: anchors then take
their row blocks, and the gathered candidates their column blocks, in launches of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SELF = 1  # drop the entry of the anchor's own pair (the anchor itself, or its own hard negatives)
GROUP = 2  # drop the other pairs of the anchor's group (group ids; never applied to hard negatives)

SEGMENTS = ("q", "d", "n")  # candidate segments: queries, positive documents, hard negatives


@dataclass(frozen=True)
class Block:
    """One logit block: ``anchor`` rows against the ``segment`` columns, selected by ``direction``.
    ``hardness``: the block takes the hardness penalty of ``hardness_mode`` (q2d only)."""

    direction: str
    anchor: str
    segment: str
    mask: int
    hardness: bool = False


BLOCKS = (
    Block("q2d", "q", "d", GROUP, True),  # q_i against the positives, minus its group-mates' (not its own)
    Block("q2d", "q", "n", 0, True),  # ... and against every hard negative
    Block("q2q", "q", "q", SELF | GROUP),  # q_i against the other queries, minus its group
    Block("d2q", "d", "q", GROUP),  # d_i against the queries (q_i is its positive)
    Block("d2d", "d", "d", SELF | GROUP),  # d_i against the other positives, minus its group
    Block("d2d", "d", "n", SELF),  # ... and the hard negatives of the other pairs
)

#: Hardness modes: which q2d entries take the penalty, for a positive and a hard-negative column,
#: as bits over the entry's pairs (SELF: the anchor's own pair, 2: another pair).
OTHER = 2
HARDNESS = {
    None: {"d": 0, "n": 0},
    "in_batch_negatives": {"d": OTHER, "n": OTHER},
    "hard_negatives": {"d": 0, "n": SELF},
    "all_negatives": {"d": OTHER, "n": SELF | OTHER},
}


@dataclass(frozen=True)
class Walk:
    """How a launch walks one candidate segment: as row blocks, column blocks, or both at once.
    ``penalised``: "row" or "col", the role whose block takes the hardness penalty (at most one)."""

    row: bool = False
    col: bool = False
    mask: int = 0
    penalised: str | None = None


@dataclass(frozen=True)
class Launch:
    """One kernel launch: programs own rows of ``rows`` and walk the segments in ``walks``.

    ``rows`` names the tensor: "q", "d" (the anchors), "n" (hard negatives), or "q_all", "d_all",
    "n_all" (a gathered batch's candidates). ``anchor`` is "q" or "d" when the rows are anchors of
    some walk's row blocks (their statistics are read), else None. ``candidates_are_anchors``: the
    walked segments are the local anchors (a gathered batch's column launches), not the candidates.
    """

    rows: str
    anchor: str | None
    walks: dict[str, Walk] = field(default_factory=dict)
    candidates_are_anchors: bool = False

    def flags(self, has_groups: bool, hardness_mode: str | None = None,
              has_hard_negatives: bool = True) -> dict[str, int | bool]:
        """The kernels' constexpr flags: ``{Q,D,N}_ROW``, ``{Q,D}_COL``, ``{Q,D,N}_MASK`` and
        ``{Q,D,N}_PEN``. Without group ids the GROUP bit is cleared (nothing to compare); without
        hard negatives their segment is not walked (so a walk with N_ROW has at least one block of
        them: the kernels rely on it to know their last walk at compile time). PEN holds
        the pair bits (SELF, OTHER) of the entries that take the hardness penalty; on the Q segment
        it applies to the column role (queries anchor the tile's columns), on D and N to the row
        role; the bits depend on whether the entry's document is a positive or a hard negative."""
        out: dict[str, int | bool] = {}
        for seg in SEGMENTS:
            walk = self.walks.get(seg, Walk()) if seg != "n" or has_hard_negatives else Walk()
            key = seg.upper()
            out[f"{key}_ROW"] = walk.row
            if seg != "n":  # hard negatives are never anchors
                out[f"{key}_COL"] = walk.col
            out[f"{key}_MASK"] = walk.mask if has_groups else walk.mask & ~GROUP
            pen = 0
            if walk.penalised:
                assert walk.penalised == ("col" if seg == "q" else "row"), (self, seg)
                document = seg if walk.penalised == "row" else self.rows[0]  # "d" or "n"
                pen = HARDNESS[hardness_mode][document]
            out[f"{key}_PEN"] = pen
        return out


    def finish_flags(self, normed: bool, want_dots: bool) -> dict[str, bool]:
        """The grad kernel's epilogue flags: FUSED, its last sweep writes the gradient in the input
        dtype (not with NORMED, whose row sums need the whole float32 row first: the epilogue kernel
        finishes those); PARTNER, the positive logit's term (the anchors q and d); DOTS_WANTED, the
        rows' <x, grad> for the temperature's gradient."""
        fused = bool(self.walks) and not normed
        return dict(FUSED=fused, PARTNER=fused and self.rows in ("q", "d"), DOTS_WANTED=fused and want_dots)


def selected(directions) -> list[Block]:
    return [b for b in BLOCKS if b.direction in directions]


def _block(blocks, anchor, segment) -> Block | None:
    found = [b for b in blocks if b.anchor == anchor and b.segment == segment]
    return found[0] if found else None


def forward_launches(directions) -> list[Launch]:
    """One launch per anchor kind: its rows' log-partition over every segment of its blocks."""
    blocks = selected(directions)
    launches = []
    for anchor in ("q", "d"):
        walks = {b.segment: Walk(row=True, mask=b.mask, penalised="row" if b.hardness else None)
                 for b in blocks if b.anchor == anchor}
        if walks:
            launches.append(Launch(anchor, anchor, walks))
    return launches


def backward_launches(directions, shared: bool) -> list[Launch]:
    """The launches that produce every gradient, each writing a buffer no other launch touches.

    ``shared``: the candidates are the anchors (one process, no gathered batch). Each tensor X then
    owns one launch: for each segment Y, the row block (X anchors, Y candidates) and the column
    block (Y anchors, X candidates) are one tile walk. Otherwise the local anchors "q", "d" walk
    their row blocks over the gathered candidates, and "q_all", "d_all", "n_all" walk their column
    blocks over the local anchors. A launch with no walk (a tensor with no role) is omitted, except
    "q" and "d", whose positive logit always gives them a gradient (a zero buffer then).
    """
    blocks = selected(directions)
    launches = []
    if shared:
        for x in SEGMENTS:
            walks = {}
            for y in SEGMENTS:
                as_row, as_col = _block(blocks, x, y), _block(blocks, y, x)
                if as_row and as_col:
                    assert as_row.mask == as_col.mask, (as_row, as_col)  # the relations are symmetric
                if as_row or as_col:
                    penalised = "row" if as_row and as_row.hardness else "col" if as_col and as_col.hardness else None
                    walks[y] = Walk(row=as_row is not None, col=as_col is not None, mask=(as_row or as_col).mask,
                                    penalised=penalised)
            if walks or x != "n":
                launches.append(Launch(x, x if any(w.row for w in walks.values()) else None, walks))
        return launches
    for x in ("q", "d"):
        walks = {b.segment: Walk(row=True, mask=b.mask, penalised="row" if b.hardness else None)
                 for b in blocks if b.anchor == x}
        launches.append(Launch(x, x if walks else None, walks))
    for x in SEGMENTS:
        walks = {b.anchor: Walk(col=True, mask=b.mask, penalised="col" if b.hardness else None)
                 for b in blocks if b.segment == x}
        if walks:
            launches.append(Launch(f"{x}_all", None, walks, candidates_are_anchors=True))
    return launches


def tile_units(directions, n_hard: int, shared: bool) -> tuple[int, int]:
    """(executed, textbook) tile matmuls of a forward + backward with N x N blocks as the unit: each
    walked segment costs one tile product in the forward; in the backward, two per walk (recompute
    and G Y), per hard-negative block for "n". Textbook: 3 per block (one forward, two backward)."""
    blocks = selected(directions)
    width = {"q": 1, "d": 1, "n": n_hard}

    def units(launch, per_walk):
        return sum(per_walk * width[seg] * (n_hard if launch.rows.startswith("n") else 1)
                   for seg in launch.walks)

    executed = sum(units(launch, 1) for launch in forward_launches(directions))
    executed += sum(units(launch, 2) for launch in backward_launches(directions, shared))
    textbook = sum(3 * width[b.segment] for b in blocks)
    return executed, textbook
