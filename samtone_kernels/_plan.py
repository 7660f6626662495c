"""The one table of the loss's logit blocks, and what every backend derives from it.

Nothing here touches a tensor. A *block* is one anchor kind against one candidate *segment* of N rows:
the queries "q", the positive documents "d", or a block of hard negatives "n" (``hard_negatives[:, k]``).
``BLOCKS`` says, per block, which direction selects it, who the anchors and the candidates are, which
entries it removes (``SELF``: the anchor's own pair; ``GROUP``: the other pairs of its group), and
whether the hardness penalty applies (``HARDNESS`` says to which entries). The gradient of a block
reaches both its anchors and its candidates (the penalty is a constant: ``stop_grad``).

Readers:

* the torch backend (``_torch_impl``) builds its masks and penalties block by block from ``BLOCKS``;
* the fused kernels (``_triton``) take their launches from ``forward_launches`` and
  ``backward_launches``, each segment's part in a launch as one integer *role* (``Launch.roles``:
  the ``ROW`` / ``COL`` / ``DROP_*`` / ``PEN_*`` bits), and the grad kernel's last step from
  ``Launch.finish`` (``FUSED`` / ``PARTNER`` / ``DOTS`` bits);
* the fake implementations, the work count (``tile_units``) and the GPU compile check read the same
  launches. The NumPy reference (``reference/``) stays independent: it is the definition, and the tests
  hold the backends that read this table to it.

A new direction is one ``Block`` row here (and its definition in the reference); a new mask rule is one
bit of ``drops`` read by ``_torch_impl.dropped`` and ``_triton.tiles.keep_mask``.

A tile of logits ``S = scale * X Y^T`` serves every block that has the same two tensors, in either
order: as a **row** block its rows are anchors (X anchors, Y candidates, the rows' statistics); as a
**column** block its columns are anchors (Y anchors, X candidates; ``s(y_j, x_i)`` is the same
number, with the columns' statistics). With the candidates being the anchors themselves (one
process, the whole batch), each tensor's whole gradient comes from one launch that owns its rows, so
no launch reads what another wrote. Across devices a tile's transpose may belong to another rank:
anchors then take their row blocks, and the gathered candidates their column blocks, in launches of
their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: What a block removes from its anchor's softmax (``Block.drops``).
SELF = 1  # the entry of the anchor's own pair (the anchor itself, or its own hard negatives)
GROUP = 2  # the other pairs of the anchor's group (group ids; never applied to hard negatives)
#: Which entries of a penalised block take the hardness penalty (``HARDNESS``): pair bits of the entry.
OWN = 1  # the anchor's own pair (its positive, or its own hard negatives)
OTHER = 2  # another pair

SEGMENTS = ("q", "d", "n")  # candidate segments: queries, positive documents, hard negatives

#: Every valid direction set, in canonical order: those of either partition, and those whose document
#: anchors have no "d2q" (only one joint softmax holds their positive: partition="joint" only).
DIRECTION_SETS = (
    ("q2d",),
    ("q2d", "q2q"),
    ("q2d", "d2q"),
    ("q2d", "q2q", "d2q"),
    ("q2d", "d2q", "d2d"),
    ("q2d", "q2q", "d2q", "d2d"),
)
JOINT_ONLY_SETS = (("q2d", "d2d"), ("q2d", "q2q", "d2d"))


@dataclass(frozen=True)
class Block:
    """One logit block: ``anchor`` rows against the ``segment`` columns, selected by ``direction``.

    ``drops``: ``SELF | GROUP`` bits of the entries it removes. ``hardness``: the block takes the
    hardness penalty of ``hardness_mode`` (the q2d softmax only), on the entries ``HARDNESS`` names.
    ``holds_positive``: the entry of the anchor's own pair is its positive (q2d's positives, d2q),
    which the false-negative margin never removes.
    """

    direction: str
    anchor: str
    segment: str
    drops: int
    hardness: bool = False
    holds_positive: bool = False

    def penalty(self, hardness_mode: str | None) -> int:
        """``OWN | OTHER`` bits of the entries that take the hardness penalty (0: none)."""
        return HARDNESS[hardness_mode][self.segment] if self.hardness else 0


BLOCKS = (
    Block("q2d", "q", "d", GROUP, True, True),  # q_i against the positives, minus its group-mates' (not its own)
    Block("q2d", "q", "n", 0, True),  # ... and against every hard negative
    Block("q2q", "q", "q", SELF | GROUP),  # q_i against the other queries, minus its group
    Block("d2q", "d", "q", GROUP, holds_positive=True),  # d_i against the queries (q_i is its positive)
    Block("d2d", "d", "d", SELF | GROUP),  # d_i against the other positives, minus its group
    Block("d2d", "d", "n", SELF),  # ... and the hard negatives of the other pairs
)

#: Hardness modes: which entries of the q2d blocks take the penalty, per segment (positive documents,
#: hard negatives), as pair bits (``OWN``, ``OTHER``).
HARDNESS = {
    None: {"d": 0, "n": 0},
    "in_batch_negatives": {"d": OTHER, "n": OTHER},
    "hard_negatives": {"d": 0, "n": OWN},
    "all_negatives": {"d": OTHER, "n": OWN | OTHER},
}

# A segment's part in a kernel launch, as the bits of one integer constexpr (``Launch.roles``).
ROW = 1  # the program's rows are anchors of the block (the segment's rows their candidates)
COL = 2  # the segment's rows are anchors of the block and the program's rows their candidates
DROP_SELF = 4  # SELF: the block removes the own pair's entry
DROP_GROUP = 8  # GROUP: the block removes the other pairs of the group
PEN_OWN = 16  # the hardness penalty on the own pair's entry
PEN_OTHER = 32  # ... on other pairs' entries
PEN_COL = 64  # the penalty is in the column role's softmax (else the row role's)
DROP_MARGIN = 128  # the false-negative margin removes entries more similar than the anchor's positive
POSITIVE = 256  # ... except the own pair's entry, which is the anchor's positive (``Block.holds_positive``)

# The grad kernel's last step (``Launch.finish``), as the bits of one integer constexpr.
FUSED = 1  # the last sweep writes the gradient in the input dtype (else an epilogue kernel does)
PARTNER = 2  # ... with the positive logit's term (the anchors q and d)
DOTS = 4  # ... and each row's <x, grad> (the temperature's gradient)


def encode_directions(directions) -> str:
    """The directions as one value for a custom op's schema: ``"q2d,q2q"``."""
    return ",".join(directions)


def decode_directions(key: str) -> tuple[str, ...]:
    return tuple(key.split(","))


@dataclass(frozen=True)
class Walk:
    """How a launch walks one candidate segment: as row blocks, column blocks, or both at once.
    ``drops``: the ``SELF | GROUP`` bits of the walked blocks (equal for both roles: the relations are
    symmetric). ``penalised``: "row" or "col", the role whose block takes the hardness penalty (at
    most one)."""

    row: bool = False
    col: bool = False
    drops: int = 0
    penalised: str | None = None
    positive: bool = False  # the walked blocks hold their anchors' positives at the own pair

    def role(self, has_groups: bool, hardness_mode: str | None, document: str, margin: bool = False) -> int:
        """The integer role (bits above). Without group ids the GROUP bit is cleared (nothing to
        compare). ``document``: the segment whose q2d entries the penalty reads ("d" or "n").
        ``margin``: the false-negative margin is on."""
        role = ROW * self.row | COL * self.col
        if margin and (self.row or self.col):
            role |= DROP_MARGIN | POSITIVE * self.positive
        role |= DROP_SELF * bool(self.drops & SELF) | DROP_GROUP * bool(self.drops & GROUP and has_groups)
        if self.penalised is not None and hardness_mode is not None:
            pen = HARDNESS[hardness_mode][document]
            role |= PEN_OWN * bool(pen & OWN) | PEN_OTHER * bool(pen & OTHER)
            if pen:
                role |= PEN_COL * (self.penalised == "col")
        return role


def describe_role(role: int) -> str:
    """A role as its bit names, for messages and the compile check: ``"ROW|DROP_SELF"``."""
    names = {
        ROW: "ROW",
        COL: "COL",
        DROP_SELF: "DROP_SELF",
        DROP_GROUP: "DROP_GROUP",
        PEN_OWN: "PEN_OWN",
        PEN_OTHER: "PEN_OTHER",
        PEN_COL: "PEN_COL",
    }
    return "|".join(name for bit, name in names.items() if role & bit) or "0"


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

    def roles(
        self, has_groups: bool, hardness_mode: str | None = None, has_hard_negatives: bool = True, margin: bool = False
    ) -> dict[str, int]:
        """The kernels' role constexprs ``Q_ROLE``, ``D_ROLE``, ``N_ROLE`` (0: the segment is not
        walked). Without hard negatives their segment is not walked, so a launch with ``N_ROLE`` has
        at least one block of them (the kernels rely on it to know their last walk at compile time).
        The penalty sits on the column role of the Q segment (queries anchor the tile's columns) and
        on the row role of D and N; its entries depend on whether the entry's document is a positive
        or a hard negative. ``margin``: the false-negative margin is on (DROP_MARGIN)."""
        out = {}
        for seg in SEGMENTS:
            walk = self.walks.get(seg, Walk()) if seg != "n" or has_hard_negatives else Walk()
            document = seg if walk.penalised != "col" else self.rows[0]  # "d" or "n"
            out[f"{seg.upper()}_ROLE"] = walk.role(has_groups, hardness_mode, document, margin)
        return out

    def finish(self, normed: bool, want_dots: bool) -> int:
        """The grad kernel's ``FINISH`` bits: FUSED, its last sweep writes the gradient in the input
        dtype (not with NORMED, whose row sums need the whole float32 row first: the epilogue kernel
        finishes those); PARTNER, the positive logit's term (the anchors q and d); DOTS, the rows'
        <x, grad> for the temperature's gradient."""
        fused = bool(self.walks) and not normed
        return FUSED * fused | PARTNER * (fused and self.rows in ("q", "d")) | DOTS * (fused and want_dots)


def selected(directions) -> list[Block]:
    return [b for b in BLOCKS if b.direction in directions]


def _block(blocks, anchor, segment) -> Block | None:
    found = [b for b in blocks if b.anchor == anchor and b.segment == segment]
    return found[0] if found else None


def _row_walk(block: Block) -> Walk:
    return Walk(row=True, drops=block.drops, penalised="row" if block.hardness else None, positive=block.holds_positive)


def _col_walk(block: Block) -> Walk:
    return Walk(col=True, drops=block.drops, penalised="col" if block.hardness else None, positive=block.holds_positive)


def forward_launches(directions) -> list[Launch]:
    """One launch per anchor kind: its rows' log-partition over every segment of its blocks."""
    blocks = selected(directions)
    launches = []
    for anchor in ("q", "d"):
        walks = {b.segment: _row_walk(b) for b in blocks if b.anchor == anchor}
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
                if as_row and as_col:  # the relations are symmetric
                    assert as_row.drops == as_col.drops, (as_row, as_col)
                    assert as_row.holds_positive == as_col.holds_positive, (as_row, as_col)
                if as_row or as_col:
                    penalised = "row" if as_row and as_row.hardness else "col" if as_col and as_col.hardness else None
                    walks[y] = Walk(
                        row=as_row is not None,
                        col=as_col is not None,
                        drops=(as_row or as_col).drops,
                        penalised=penalised,
                        positive=(as_row or as_col).holds_positive,
                    )
            if walks or x != "n":
                launches.append(Launch(x, x if any(w.row for w in walks.values()) else None, walks))
        return launches
    for x in ("q", "d"):
        walks = {b.segment: _row_walk(b) for b in blocks if b.anchor == x}
        launches.append(Launch(x, x if walks else None, walks))
    for x in SEGMENTS:
        walks = {b.anchor: _col_walk(b) for b in blocks if b.segment == x}
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
        return sum(per_walk * width[seg] * (n_hard if launch.rows.startswith("n") else 1) for seg in launch.walks)

    executed = sum(units(launch, 1) for launch in forward_launches(directions))
    executed += sum(units(launch, 2) for launch in backward_launches(directions, shared))
    textbook = sum(3 * width[b.segment] for b in blocks)
    return executed, textbook
