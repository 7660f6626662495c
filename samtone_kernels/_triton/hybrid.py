"""The hybrid backend (``backend="hybrid"``): the logits of each chunk of anchor rows come from a GEMM
in the inputs' own dtype with float32 output (cuBLAS through ``torch.mm``), and Triton epilogue
kernels (``logit_epilogues``) do every elementwise step, reading each logit chunk once per pass.

Tiles are taken once per pair of tensors, as the fused kernels' table gives them
(``_plan.backward_launches``): with the candidates being the anchors, the q-d tile serves q2d by its
rows and d2q by its columns, and a symmetric tile (q2q, d2d) serves both roles by rows, its
coefficient ``G_ij = w_i P_ij + w_j P_ji`` giving the whole gradient in one GEMM. Per chunk of c rows
of X against a segment Y:

- forward: ``S = X_c Y^T`` (one GEMM), then ``lse_partials_kernel``: the rows' partial log-partitions
  and, for a column role, the columns' partials, merged across tiles and chunks in a fixed order;
- backward: S again (one GEMM), ``coefficient_kernel`` writes G in the input dtype, then
  ``dX_c += G Y`` and, unless the tile is symmetric, ``dY += G^T X_c`` (two GEMMs, one).

Matmul work, executed / textbook (3 per block): InfoNCE 4/3, SamToNe 7/6, symmetric InfoNCE 4/6,
bidirectional SamToNe 10/12. Nothing N x M is kept: the peak is one chunk's float32 logits and its
G, plus the float32 gradient accumulators, O(N D). The chunk's rows come from a memory budget
(``chunk_bytes``). The temperature's gradient follows from homogeneity, as in the fused path.
"""

from __future__ import annotations

import torch
import triton

from .. import _plan as plan
from .._contract import LossOptions, Rows
from .._gemm import mm_f32
from .._rows import normalize_rows
from .configs import INTERPRETING
from .launch import _empty, margin_thresholds
from .logit_epilogues import coefficient_kernel, lse_partials_kernel

#: Default budget of one chunk's float32 logits plus its coefficient tile (bytes).
CHUNK_BYTES = 1 << 30
#: Tiles of the epilogue kernels (memory-bound elementwise passes): fixed, no autotuning.
EPILOGUE_TILE = dict(BLOCK_M=32, BLOCK_N=128, num_warps=4)
_INTERPRETER_TILE = dict(BLOCK_M=16, BLOCK_N=16)


def _tile() -> dict:
    return dict(_INTERPRETER_TILE) if INTERPRETING else dict(EPILOGUE_TILE)


def chunk_rows(n_cols: int, itemsize: int, budget: int | None) -> int:
    """Anchor rows per chunk: a row costs its float32 logits and its coefficients, n_cols each."""
    return max(1, (CHUNK_BYTES if budget is None else budget) // max(1, n_cols * (4 + itemsize)))


def pairs(directions, shared: bool, has_groups: bool, hardness_mode: str | None, has_hard: bool, margin: bool = False):
    """(rows X, segment Y, role) of each tile the hybrid path takes, once per pair of tensors."""
    done, out = set(), []
    for launch in plan.backward_launches(directions, shared):
        if launch.rows not in ("q", "d"):
            continue  # the candidates' gradients come from the tiles of the anchors (G^T X)
        roles = launch.roles(has_groups, hardness_mode, has_hard, margin)
        for seg in launch.walks:
            pair = frozenset((launch.rows, seg))
            if seg == "n" and not has_hard or (shared and pair in done):
                continue
            done.add(pair)
            out.append((launch.rows, seg, roles[f"{seg.upper()}_ROLE"]))
    return out


def forward_role(x_name: str, seg: str, role: int) -> int:
    """The role of a tile in the forward: its column role only where the columns are other anchors
    (d2q off the q-d tile); a symmetric tile's rows already hold its columns' statistics."""
    return role if seg != x_name else role & ~plan.COL


class _Call:
    """The tensors of one call by their plan names, and how to iterate their tiles."""

    def __init__(
        self, q, d, q_all, d_all, n_all, groups, offset, directions, hardness, hardness_mode, budget, scale, margin
    ):
        self.shared = q_all is None
        self.tensors = {"q": q, "d": d}
        # The candidates of each segment, by the name of the anchors' segment: "q" and "d" are the anchors
        # themselves when shared, "n" the hard negatives as H blocks of N rows.
        self.candidates = {"q": q if self.shared else q_all, "d": d if self.shared else d_all, "n": n_all}
        self.offset = offset
        self.groups = groups if groups is not None else q
        self.hardness = float(hardness) if hardness_mode else 0.0
        self.pairs = pairs(
            directions,
            self.shared,
            groups is not None,
            hardness_mode or None if self.hardness else None,
            n_all is not None and n_all.shape[1] > 0,
            margin is not None,
        )
        # The false-negative margin's logit threshold per global pair (a placeholder without it).
        self.thresholds = q.new_ones((), dtype=torch.float32)
        if margin is not None:
            self.thresholds = margin_thresholds(self.candidates["q"], self.candidates["d"], scale, margin)
        self.n_cand = self.candidates["q"].shape[0]
        self.step = chunk_rows(self.n_cand, q.element_size(), budget)
        self.anchors = [launch.rows for launch in plan.forward_launches(directions)]

    def blocks(self, seg: str):
        """(k, Y [N, D]) of a segment: one block, or each hard negative k (a strided view)."""
        y = self.candidates[seg]
        if seg != "n":
            return [(0, y)]
        return [(k, y[:, k]) for k in range(y.shape[1])]

    def chunks(self, x_name: str):
        n = self.tensors[x_name].shape[0]
        return [slice(r0, min(n, r0 + self.step)) for r0 in range(0, n, self.step)]

    def grid(self, n_rows: int, n_cols: int, tile: dict):
        return (triton.cdiv(n_rows, tile["BLOCK_M"]), triton.cdiv(n_cols, tile["BLOCK_N"]))


def _forward(call: _Call, scale: torch.Tensor) -> torch.Tensor:
    """[A, n] float32 log-partitions of the anchor kinds (``plan.forward_launches`` order)."""
    n = call.tensors["q"].shape[0]
    device = call.tensors["q"].device
    lse = {x: torch.full((n,), float("-inf"), dtype=torch.float32, device=device) for x in call.anchors}
    tile = _tile()
    for x_name, seg, role in call.pairs:
        x = call.tensors[x_name]
        role_fwd = forward_role(x_name, seg, role)
        fold_cols = bool(role_fwd & plan.COL)
        for _, y in call.blocks(seg):
            col_lse = torch.full((y.shape[0],), float("-inf"), dtype=torch.float32, device=device)
            for c in call.chunks(x_name):
                s = mm_f32(x[c], y.T)
                grid = call.grid(s.shape[0], s.shape[1], tile)
                row_part = _empty((grid[1], s.shape[0]), s)
                col_part = _empty((grid[0], s.shape[1]), s)
                lse_partials_kernel[grid](
                    s,
                    s.stride(0),
                    s.stride(1),
                    row_part,
                    col_part,
                    call.groups,
                    call.thresholds,
                    s.shape[0],
                    s.shape[1],
                    call.offset + c.start,
                    scale,
                    call.hardness,
                    ROLE=role_fwd,
                    **tile,
                )
                if role_fwd & plan.ROW:
                    lse[x_name][c] = torch.logaddexp(lse[x_name][c], torch.logsumexp(row_part, 0))
                if fold_cols:
                    col_lse = torch.logaddexp(col_lse, torch.logsumexp(col_part, 0))
                del s
            if fold_cols:
                lse[seg] = torch.logaddexp(lse[seg], col_lse)
    return torch.stack([lse[x] for x in call.anchors])


def _backward(call: _Call, lse: torch.Tensor, grad_lse: torch.Tensor, scale: torch.Tensor, want_dots: bool):
    """The gradients of F = sum(grad_lse * lse): (dq, dd, dq_all, dd_all, dn_all) in the inputs'
    dtypes (None for a tensor with no role) and, with ``want_dots``, sum_X <X, dF/dX>."""
    # Upstream weights rescaled to max |w| = 1 before they multiply P and G is cast to a 16-bit dtype
    # (1/N-sized products would flush to zero); the factor comes back with the scale below.
    w_max = grad_lse.abs().amax()
    w = (grad_lse * torch.where(w_max > 0, 1.0 / w_max, torch.zeros_like(w_max))).float()
    stats = {x: (lse[a].contiguous(), w[a].contiguous()) for a, x in enumerate(call.anchors)}
    acc = {}  # float32 gradient accumulators, by tensor name ("q_all" etc. for gathered candidates)
    tile = _tile()

    def grad_of(name: str, like: torch.Tensor) -> torch.Tensor:
        if name not in acc:
            acc[name] = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
        return acc[name]

    for x_name, seg, role in call.pairs:
        x = call.tensors[x_name]
        row_lse, row_w = stats[x_name]
        col_lse, col_w = stats.get(seg, (row_lse, row_w)) if role & plan.COL else (row_lse, row_w)
        symmetric = seg == x_name and call.shared
        for k, y in call.blocks(seg):
            y_name = seg if call.shared and seg != "n" else f"{seg}_all"
            for c in call.chunks(x_name):
                s = mm_f32(x[c], y.T)
                g = _empty(s.shape, s, x.dtype)
                coefficient_kernel[call.grid(s.shape[0], s.shape[1], tile)](
                    s,
                    s.stride(0),
                    s.stride(1),
                    g,
                    g.stride(0),
                    g.stride(1),
                    call.groups,
                    call.thresholds,
                    row_lse[c],
                    row_w[c],
                    col_lse,
                    col_w,
                    s.shape[0],
                    s.shape[1],
                    call.offset + c.start,
                    scale,
                    call.hardness,
                    ROLE=role,
                    **tile,
                )
                del s
                grad_of(x_name, x)[c] += mm_f32(g, y)
                if not symmetric:
                    dy = grad_of(y_name, call.candidates[seg])
                    (dy[:, k] if seg == "n" else dy).add_(mm_f32(g.T, x[c]))
    factor = scale * w_max
    grads = {name: a.mul_(factor) for name, a in acc.items()}  # in place: no second float32 copy
    dots = None
    if want_dots:  # homogeneity: dF/dscale = sum_X <X, dF/dX> / (2 scale), every tensor in every role
        sources = {
            "q": call.tensors["q"],
            "d": call.tensors["d"],
            "q_all": call.candidates["q"],
            "d_all": call.candidates["d"],
            "n_all": call.candidates["n"],
        }
        dots = sum((g * sources[name].float()).sum() for name, g in grads.items())
    return grads, dots


@torch.library.custom_op("samtone_kernels::hybrid_row_lse", mutates_args=())
def hybrid_row_lse_op(
    q: torch.Tensor,
    d: torch.Tensor,
    q_all: torch.Tensor | None,
    d_all: torch.Tensor | None,
    n_all: torch.Tensor | None,
    groups: torch.Tensor | None,
    scale: torch.Tensor,
    offset: int,
    directions: str,
    hardness: float,
    hardness_mode: str,
    budget: int,
    margin: float | None = None,
) -> torch.Tensor:
    """[A, n] float32 log-partitions of the anchors q, d [n, D] (pairs ``offset ..`` of the candidates
    q_all, d_all [N, D], n_all [N, H, D]; ``q_all = d_all = None``: the candidates are the anchors).
    ``directions``: ``plan.encode_directions``; ``budget``: bytes of a chunk's logits and
    coefficients."""
    call = _Call(
        q,
        d,
        q_all,
        d_all,
        n_all,
        groups,
        offset,
        plan.decode_directions(directions),
        hardness,
        hardness_mode,
        budget,
        scale,
        margin,
    )
    return _forward(call, scale)


@hybrid_row_lse_op.register_fake
def _(q, d, q_all, d_all, n_all, groups, scale, offset, directions, hardness, hardness_mode, budget, margin=None):
    return q.new_empty(
        (len(plan.forward_launches(plan.decode_directions(directions))), q.shape[0]), dtype=torch.float32
    )


@torch.library.custom_op("samtone_kernels::hybrid_row_lse_backward", mutates_args=())
def hybrid_row_lse_backward_op(
    grad_lse: torch.Tensor,
    lse: torch.Tensor,
    q: torch.Tensor,
    d: torch.Tensor,
    q_all: torch.Tensor | None,
    d_all: torch.Tensor | None,
    n_all: torch.Tensor | None,
    groups: torch.Tensor | None,
    scale: torch.Tensor,
    offset: int,
    directions: str,
    hardness: float,
    hardness_mode: str,
    budget: int,
    margin: float | None,
    want_dots: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dd, dq_all, dd_all, dn_all, dots): the gradients of F = sum(grad_lse * lse) in the inputs'
    dtypes, a tensor with no role as 0 rows (dn_all: H = 0), and ``sum_X <X, dF/dX>`` (0 without
    ``want_dots``)."""
    call = _Call(
        q,
        d,
        q_all,
        d_all,
        n_all,
        groups,
        offset,
        plan.decode_directions(directions),
        hardness,
        hardness_mode,
        budget,
        scale,
        margin,
    )
    grads, dots = _backward(call, lse, grad_lse, scale, want_dots)

    def out(name: str, x: torch.Tensor | None, empty_shape) -> torch.Tensor:
        if x is not None and name in grads:
            return grads[name].to(x.dtype)
        return q.new_empty(empty_shape)

    n_cand, dim = (q if q_all is None else q_all).shape
    dq = grads["q"].to(q.dtype) if "q" in grads else torch.zeros_like(q)
    dd = grads["d"].to(d.dtype) if "d" in grads else torch.zeros_like(d)
    dn = grads["n_all"].to(n_all.dtype) if "n_all" in grads else q.new_empty((n_cand, 0, dim))
    zero = torch.zeros((), dtype=torch.float32, device=q.device)
    return (
        dq,
        dd,
        out("q_all", q_all, (0, dim)),
        out("d_all", d_all, (0, dim)),
        dn,
        dots.float() if dots is not None else zero,
    )


@hybrid_row_lse_backward_op.register_fake
def _(
    grad_lse,
    lse,
    q,
    d,
    q_all,
    d_all,
    n_all,
    groups,
    scale,
    offset,
    directions,
    hardness,
    hardness_mode,
    budget,
    margin,
    want_dots,
):
    n_cand, dim = (q if q_all is None else q_all).shape
    shared = q_all is None
    has = {launch.rows for launch in plan.backward_launches(plan.decode_directions(directions), shared)}

    def rows(x, present):
        return x.new_empty(x.shape if x is not None and present else (0, dim))

    dn = n_all.new_empty(n_all.shape) if n_all is not None and ({"n", "n_all"} & has) else q.new_empty((n_cand, 0, dim))
    return (
        q.new_empty(q.shape),
        d.new_empty(d.shape),
        rows(q_all, "q_all" in has),
        rows(d_all, "d_all" in has),
        dn,
        q.new_empty((), dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    q, d, q_all, d_all, n_all, groups, scale, offset, directions, hardness, hardness_mode, budget, margin = inputs
    ctx.save_for_backward(q, d, q_all, d_all, n_all, groups, scale, output)
    ctx.flags = (offset, directions, hardness, hardness_mode, budget, margin)


def _autograd_backward(ctx, grad_lse):
    q, d, q_all, d_all, n_all, groups, scale, lse = ctx.saved_tensors
    want_dots = ctx.needs_input_grad[6]
    *grads, dots = hybrid_row_lse_backward_op(
        grad_lse.contiguous(), lse, q, d, q_all, d_all, n_all, groups, scale, *ctx.flags, want_dots
    )
    dq, dd, dq_all, dd_all, dn_all = (
        None if x is None or gx.shape != x.shape else gx for x, gx in zip((q, d, q_all, d_all, n_all), grads)
    )
    dscale = (dots / (2 * scale)).to(scale.dtype) if want_dots else None
    return dq, dd, dq_all, dd_all, dn_all, None, dscale, None, None, None, None, None, None


hybrid_row_lse_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def prepare_hybrid(embeddings: list[torch.Tensor], options: LossOptions) -> list[torch.Tensor]:
    """The GEMMs read the inputs' own dtype: nothing is upcast. Normalisation goes into a copy
    (``normalize_rows``, which saves no float32 copy for the backward)."""
    if options.normalize:
        return [normalize_rows(x) for x in embeddings]
    return list(embeddings)


def row_stats_hybrid(rows: Rows, options: LossOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """The hybrid backend's ``row_stats``: the [A, n] float32 log-partitions (``hybrid_row_lse_op``)
    and the [n] positive logits ``scale * q_i . d_i`` (torch, in float32)."""
    q, d, scale = rows.q, rows.d, rows.scale
    if not isinstance(scale, torch.Tensor):
        scale = torch.full((), scale, dtype=torch.float32, device=q.device)
    q_all, d_all = (None, None) if rows.shared else (rows.q_all, rows.d_all)
    n_all = rows.n_all if rows.n_all is not None and rows.n_all.shape[1] > 0 else None
    budget = options.chunk_bytes if options.chunk_bytes is not None else CHUNK_BYTES
    lse = hybrid_row_lse_op(
        q,
        d,
        q_all,
        d_all,
        n_all,
        rows.group_ids,
        scale.float(),
        rows.offset,
        plan.encode_directions(options.directions),
        options.hardness,
        options.hardness_mode or "",
        budget,
        options.false_negative_margin,
    )
    pos = (q.float() * d.float()).sum(-1) * scale.float()
    return lse, pos
