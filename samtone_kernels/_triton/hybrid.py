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

Matryoshka prefixes m_1 < .. < m_K = D, in one pass: each GEMM above becomes one GEMM per slice
``m_{k-1}:m_k`` of D, the same matmul work. The forward's running sum ``S_k = S_{k-1} + X_c[:, slice_k]
Y[:, slice_k]^T`` gives every prefix's raw dots, each read by its own ``lse_partials_kernel`` launch.
The backward keeps the chunk's K float32 tiles S_k; one ``coefficient_kernel`` launch writes the K
running sums ``H_k = sum_{k' >= k} G_k'``, and ``dX_c[:, slice_k] += H_k Y[:, slice_k]`` (and ``dY``
likewise): slice k of D is in the prefixes k..K, whose coefficients add. With ``normalize`` the rows
stay raw and each prefix's logits are ``scale * S_k a_i b_j`` with the inverse prefix norms a, b
(``_rows.prefix_inverse_norms``), inputs of the op: ``coefficient_kernel`` folds a b into H_k and
returns the gradient with respect to a and b, which autograd carries back to the rows.
"""

from __future__ import annotations

import torch
import triton

from .. import _plan as plan
from .._contract import LossOptions, Rows
from .._gemm import addmm_f32_, mm_f32
from .._rows import normalize_rows, prefix_dots, prefix_inverse_norms
from .configs import INTERPRETING
from .launch import _empty, margin_thresholds
from .logit_epilogues import coefficient_kernel, lse_partials_kernel

#: Default budget of one chunk's float32 logits plus its coefficient tile (bytes).
CHUNK_BYTES = 1 << 30
#: Tiles of the epilogue kernels (memory-bound elementwise passes): fixed, no autotuning.
EPILOGUE_TILE = dict(BLOCK_M=32, BLOCK_N=128, num_warps=4)
#: The backward's with Matryoshka prefixes (a loop over them, their norms' sums): twice the warps, half
#: the elements per thread (at 4 warps the heaviest role holds 251-255 registers and spills on sm_89).
PREFIX_TILE = dict(BLOCK_M=32, BLOCK_N=128, num_warps=8)
_INTERPRETER_TILE = dict(BLOCK_M=16, BLOCK_N=16)


def _tile(prefixes: bool = False) -> dict:
    if INTERPRETING:
        return dict(_INTERPRETER_TILE)
    return dict(PREFIX_TILE if prefixes else EPILOGUE_TILE)


def chunk_rows(n_cols: int, itemsize: int, budget: int | None, prefixes: int = 1) -> int:
    """Anchor rows per chunk: a row costs its float32 logits and its coefficients, n_cols each, once
    per Matryoshka prefix (the backward keeps every prefix's)."""
    per_row = n_cols * prefixes * (4 + itemsize)
    return max(1, (CHUNK_BYTES if budget is None else budget) // max(1, per_row))


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
        self,
        q,
        d,
        q_all,
        d_all,
        n_all,
        groups,
        offset,
        directions,
        hardness,
        hardness_mode,
        budget,
        scale,
        margin,
        dims=None,
        norms=None,
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
        # The Matryoshka slices of D (one, the whole of D, without prefixes), and the inverse prefix
        # norms [rows, K] ([N, H, K] for "n") by tensor name, or None: the logits need no norms.
        dim = q.shape[1]
        self.slices = list(zip((0, *dims[:-1]), dims)) if dims else [(0, dim)]
        inv_q, inv_d, inv_q_all, inv_d_all, inv_n = norms if norms is not None else (None,) * 5
        self.normed = inv_q is not None
        self.norms = {"q": inv_q, "d": inv_d, "q_all": inv_q_all, "d_all": inv_d_all, "n_all": inv_n}
        if self.shared:
            self.norms.update(q_all=inv_q, d_all=inv_d)
        self.placeholder = q.new_ones((1,), dtype=torch.float32)  # a pointer never read
        # The false-negative margin's logit threshold per prefix and global pair [K, N] (a placeholder
        # without it).
        self.thresholds = self.placeholder.view(1, 1).expand(len(self.slices), 1)
        if margin is not None:
            if dims:
                positive = prefix_dots(self.candidates["q"], self.candidates["d"], tuple(dims), self.normed)
                self.thresholds = ((positive + margin) * scale.detach().float()).contiguous()
            else:
                self.thresholds = margin_thresholds(self.candidates["q"], self.candidates["d"], scale, margin)[None]
        self.n_cand = self.candidates["q"].shape[0]
        self.step = chunk_rows(self.n_cand, q.element_size(), budget, len(self.slices))
        self.anchors = [launch.rows for launch in plan.forward_launches(directions)]

    def blocks(self, seg: str):
        """(k, Y [N, D], its inverse norms [N, K] or None) of a segment: one block, or each hard
        negative k (strided views)."""
        y = self.candidates[seg]
        norms = self.norms["n_all" if seg == "n" else f"{seg}_all"]
        if seg != "n":
            return [(0, y, norms)]
        return [(k, y[:, k], None if norms is None else norms[:, k]) for k in range(y.shape[1])]

    def chunks(self, x_name: str):
        n = self.tensors[x_name].shape[0]
        return [slice(r0, min(n, r0 + self.step)) for r0 in range(0, n, self.step)]

    def grid(self, n_rows: int, n_cols: int, tile: dict):
        return (triton.cdiv(n_rows, tile["BLOCK_M"]), triton.cdiv(n_cols, tile["BLOCK_N"]))

    def norm_args(self, norms: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """(pointer, row stride) of inverse norms for a kernel, the placeholder without them."""
        return (self.placeholder, 0) if norms is None else (norms, norms.stride(0))


def _forward(call: _Call, scale: torch.Tensor) -> torch.Tensor:
    """[K, A, n] float32 log-partitions of the anchor kinds (``plan.forward_launches`` order) for each
    Matryoshka prefix (K = 1 without)."""
    n = call.tensors["q"].shape[0]
    device = call.tensors["q"].device
    n_prefixes = len(call.slices)
    lse = {x: torch.full((n_prefixes, n), float("-inf"), dtype=torch.float32, device=device) for x in call.anchors}
    tile = _tile()
    for x_name, seg, role in call.pairs:
        x = call.tensors[x_name]
        x_norms = call.norms[x_name]
        role_fwd = forward_role(x_name, seg, role)
        fold_cols = bool(role_fwd & plan.COL)
        for _, y, y_norms in call.blocks(seg):
            col_lse = torch.full((n_prefixes, y.shape[0]), float("-inf"), dtype=torch.float32, device=device)
            for c in call.chunks(x_name):
                s = None
                for k, (lo, hi) in enumerate(call.slices):
                    # the running sum: prefix k's raw dots
                    if s is None:
                        s = mm_f32(x[c, lo:hi], y[:, lo:hi].T)
                    else:
                        addmm_f32_(s, x[c, lo:hi], y[:, lo:hi].T)
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
                        call.thresholds[k],
                        *call.norm_args(None if x_norms is None else x_norms[c, k]),
                        *call.norm_args(None if y_norms is None else y_norms[:, k]),
                        s.shape[0],
                        s.shape[1],
                        call.offset + c.start,
                        scale,
                        call.hardness,
                        ROLE=role_fwd,
                        NORMED=call.normed,
                        **tile,
                    )
                    if role_fwd & plan.ROW:
                        lse[x_name][k, c] = torch.logaddexp(lse[x_name][k, c], torch.logsumexp(row_part, 0))
                    if fold_cols:
                        col_lse[k] = torch.logaddexp(col_lse[k], torch.logsumexp(col_part, 0))
                del s
            if fold_cols:
                lse[seg] = torch.logaddexp(lse[seg], col_lse)
    return torch.stack([lse[x] for x in call.anchors], 1)


def _backward(call: _Call, lse: torch.Tensor, grad_lse: torch.Tensor, scale: torch.Tensor, want_dots: bool):
    """The gradients of F = sum(grad_lse * lse), lse and grad_lse [K, A, n]: a dict by tensor name
    ("q", "d", "q_all", "d_all", "n_all"; only those with a role) of float32 gradients, one of the
    inverse prefix norms' gradients (with norms), and, with ``want_dots``, sum_X <X, dF/dX> over the
    rows' direct gradients."""
    # Upstream weights rescaled to max |w| = 1 before they multiply P and G is cast to a 16-bit dtype
    # (1/N-sized products would flush to zero); the factor comes back with the scale below.
    w_max = grad_lse.abs().amax()
    w = (grad_lse * torch.where(w_max > 0, 1.0 / w_max, torch.zeros_like(w_max))).float()
    stats = {x: (lse[:, a].contiguous(), w[:, a].contiguous()) for a, x in enumerate(call.anchors)}
    n_prefixes = len(call.slices)
    acc = {}  # float32 gradient accumulators, by tensor name ("q_all" etc. for gathered candidates)
    norm_acc = {}  # float32 gradients of the inverse prefix norms, by the same names
    tile = _tile(prefixes=n_prefixes > 1 or call.normed)

    def grad_of(store: dict, name: str, like: torch.Tensor) -> torch.Tensor:
        if name not in store:
            store[name] = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
        return store[name]

    for x_name, seg, role in call.pairs:
        x = call.tensors[x_name]
        x_norms = call.norms[x_name]
        row_lse, row_w = stats[x_name]
        col_lse, col_w = stats.get(seg, (row_lse, row_w)) if role & plan.COL else (row_lse, row_w)
        symmetric = seg == x_name and call.shared
        for h, y, y_norms in call.blocks(seg):
            y_name = seg if call.shared and seg != "n" else f"{seg}_all"
            for c in call.chunks(x_name):
                # every prefix's raw dots, kept: the coefficients run last prefix first
                s = torch.empty((n_prefixes, c.stop - c.start, y.shape[0]), dtype=torch.float32, device=x.device)
                for k, (lo, hi) in enumerate(call.slices):
                    if k == 0:
                        mm_f32(x[c, lo:hi], y[:, lo:hi].T, out=s[0])
                    else:
                        addmm_f32_(s[k].copy_(s[k - 1]), x[c, lo:hi], y[:, lo:hi].T)
                g = _empty(s.shape, s, x.dtype)
                grid = call.grid(s.shape[1], s.shape[2], tile)
                row_dots = col_dots = call.placeholder
                if call.normed:
                    row_dots = _empty((n_prefixes, grid[1], s.shape[1]), s)
                    col_dots = _empty((n_prefixes, grid[0], s.shape[2]), s)
                coefficient_kernel[grid](
                    s,
                    s.stride(0),
                    s.stride(1),
                    s.stride(2),
                    g,
                    g.stride(0),
                    g.stride(1),
                    g.stride(2),
                    call.groups,
                    call.thresholds,
                    call.thresholds.stride(0),
                    row_lse[:, c],
                    row_w[:, c],
                    row_lse.stride(0),
                    col_lse,
                    col_w,
                    col_lse.stride(0),
                    *call.norm_args(None if x_norms is None else x_norms[c]),
                    *call.norm_args(y_norms),
                    row_dots,
                    col_dots,
                    s.shape[1],
                    s.shape[2],
                    n_prefixes,
                    call.offset + c.start,
                    scale,
                    call.hardness,
                    ROLE=role,
                    PREFIXED=n_prefixes > 1 or call.normed,
                    NORMED=call.normed,
                    **tile,
                )
                del s
                # slice k of D is in the prefixes k..K: g[k] holds their coefficients' sum
                dx = grad_of(acc, x_name, x)
                dy = None if symmetric else grad_of(acc, y_name, call.candidates[seg])
                for k, (lo, hi) in enumerate(call.slices):
                    dx[c, lo:hi] += mm_f32(g[k], y[:, lo:hi])
                    if dy is not None:
                        (dy[:, h, lo:hi] if seg == "n" else dy[:, lo:hi]).add_(mm_f32(g[k].T, x[c, lo:hi]))
                if call.normed:  # a symmetric tile's rows hold its columns' part (G_ij = G_ji)
                    grad_of(norm_acc, x_name, x_norms)[c] += row_dots.sum(1).T
                    if dy is not None:
                        dn = grad_of(norm_acc, y_name, call.norms[y_name])
                        (dn[:, h] if seg == "n" else dn).add_(col_dots.sum(1).T)
    factor = scale * w_max
    grads = {name: a.mul_(factor) for name, a in acc.items()}  # in place: no second float32 copy
    norm_grads = {name: a.mul_(factor) for name, a in norm_acc.items()}
    dots = None
    if want_dots:  # homogeneity: dF/dscale = sum_X <X, dF/dX> / (2 scale) over the dots' direct gradients
        sources = {
            "q": call.tensors["q"],
            "d": call.tensors["d"],
            "q_all": call.candidates["q"],
            "d_all": call.candidates["d"],
            "n_all": call.candidates["n"],
        }
        dots = sum((g * sources[name].float()).sum() for name, g in grads.items())
    return grads, norm_grads, dots


def _call(
    q, d, q_all, d_all, n_all, groups, scale, offset, directions, hardness, hardness_mode, budget, margin, dims, norms
) -> _Call:
    return _Call(
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
        dims,
        norms if norms[0] is not None else None,
    )


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
    dims: list[int] | None = None,
    inv_q: torch.Tensor | None = None,
    inv_d: torch.Tensor | None = None,
    inv_q_all: torch.Tensor | None = None,
    inv_d_all: torch.Tensor | None = None,
    inv_n_all: torch.Tensor | None = None,
) -> torch.Tensor:
    """[K, A, n] float32 log-partitions of the anchors q, d [n, D] (pairs ``offset ..`` of the
    candidates q_all, d_all [N, D], n_all [N, H, D]; ``q_all = d_all = None``: the candidates are the
    anchors) for each Matryoshka prefix ``dims`` (K = 1 without). ``inv_*``: the rows' inverse prefix
    norms [rows, K] ([N, H, K]) when each prefix is normalised, else None (the gathered ones None
    too when the candidates are the anchors). ``directions``: ``plan.encode_directions``; ``budget``:
    bytes of a chunk's logits and coefficients."""
    norms = (inv_q, inv_d, inv_q_all, inv_d_all, inv_n_all)
    call = _call(
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
        dims,
        norms,
    )
    return _forward(call, scale)


@hybrid_row_lse_op.register_fake
def _(
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
    margin=None,
    dims=None,
    inv_q=None,
    inv_d=None,
    inv_q_all=None,
    inv_d_all=None,
    inv_n_all=None,
):
    anchors = len(plan.forward_launches(plan.decode_directions(directions)))
    return q.new_empty((len(dims) if dims else 1, anchors, q.shape[0]), dtype=torch.float32)


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
    dims: list[int] | None,
    inv_q: torch.Tensor | None,
    inv_d: torch.Tensor | None,
    inv_q_all: torch.Tensor | None,
    inv_d_all: torch.Tensor | None,
    inv_n_all: torch.Tensor | None,
    want_dots: bool,
) -> list[torch.Tensor]:
    """[dq, dd, dq_all, dd_all, dn_all, dinv_q, dinv_d, dinv_q_all, dinv_d_all, dinv_n_all, dots]: the
    gradients of F = sum(grad_lse * lse) in the inputs' dtypes (the norms' in float32), a tensor with
    no role as 0 rows (dn_all: H = 0; norms: [0, 0]), and ``sum_X <X, dF/dX>`` over the rows' direct
    gradients (0 without ``want_dots``)."""
    norms = (inv_q, inv_d, inv_q_all, inv_d_all, inv_n_all)
    call = _call(
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
        dims,
        norms,
    )
    grads, norm_grads, dots = _backward(call, lse, grad_lse, scale, want_dots)

    def out(name: str, x: torch.Tensor | None, empty_shape) -> torch.Tensor:
        if x is not None and name in grads:
            return grads[name].to(x.dtype)
        return q.new_empty(empty_shape)

    def norm_out(name: str, inv: torch.Tensor | None) -> torch.Tensor:
        if inv is not None and name in norm_grads:
            return norm_grads[name]
        if inv is not None and name in ("q", "d"):  # as dq, dd: always their shape
            return torch.zeros_like(inv)
        return q.new_empty((0, 0), dtype=torch.float32)

    n_cand, dim = (q if q_all is None else q_all).shape
    dq = grads["q"].to(q.dtype) if "q" in grads else torch.zeros_like(q)
    dd = grads["d"].to(d.dtype) if "d" in grads else torch.zeros_like(d)
    dn = grads["n_all"].to(n_all.dtype) if "n_all" in grads else q.new_empty((n_cand, 0, dim))
    zero = torch.zeros((), dtype=torch.float32, device=q.device)
    return [
        dq,
        dd,
        out("q_all", q_all, (0, dim)),
        out("d_all", d_all, (0, dim)),
        dn,
        *(norm_out(name, inv) for name, inv in zip(("q", "d", "q_all", "d_all", "n_all"), norms)),
        dots.float() if dots is not None else zero,
    ]


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
    dims,
    inv_q,
    inv_d,
    inv_q_all,
    inv_d_all,
    inv_n_all,
    want_dots,
):
    n_cand, dim = (q if q_all is None else q_all).shape
    shared = q_all is None
    has = {launch.rows for launch in plan.backward_launches(plan.decode_directions(directions), shared)}

    def rows(x, present):
        return x.new_empty(x.shape if x is not None and present else (0, dim))

    def norm(inv, present):
        return q.new_empty(inv.shape if inv is not None and present else (0, 0), dtype=torch.float32)

    n_present = n_all is not None and bool({"n", "n_all"} & has)
    dn = n_all.new_empty(n_all.shape) if n_present else q.new_empty((n_cand, 0, dim))
    return [
        q.new_empty(q.shape),
        d.new_empty(d.shape),
        rows(q_all, "q_all" in has),
        rows(d_all, "d_all" in has),
        dn,
        norm(inv_q, True),
        norm(inv_d, True),
        norm(inv_q_all, "q_all" in has),
        norm(inv_d_all, "d_all" in has),
        norm(inv_n_all, n_present),
        q.new_empty((), dtype=torch.float32),
    ]


def _setup_context(ctx, inputs, output):
    q, d, q_all, d_all, n_all, groups, scale, offset, directions, hardness, hardness_mode, budget, margin, dims = (
        inputs[:14]
    )
    ctx.save_for_backward(q, d, q_all, d_all, n_all, groups, scale, output, *inputs[14:])
    ctx.flags = (offset, directions, hardness, hardness_mode, budget, margin, dims)


def _autograd_backward(ctx, grad_lse):
    q, d, q_all, d_all, n_all, groups, scale, lse, *norms = ctx.saved_tensors
    want_dots = ctx.needs_input_grad[6]
    *grads, dots = hybrid_row_lse_backward_op(
        grad_lse.contiguous(), lse, q, d, q_all, d_all, n_all, groups, scale, *ctx.flags, *norms, want_dots
    )
    inputs = (q, d, q_all, d_all, n_all, *norms)
    dq, dd, dq_all, dd_all, dn_all, *dnorms = (
        None if x is None or gx.shape != x.shape else gx for x, gx in zip(inputs, grads)
    )
    dscale = (dots / (2 * scale)).to(scale.dtype) if want_dots else None
    return dq, dd, dq_all, dd_all, dn_all, None, dscale, None, None, None, None, None, None, None, *dnorms


hybrid_row_lse_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def prepare_hybrid(embeddings: list[torch.Tensor], options: LossOptions) -> list[torch.Tensor]:
    """The GEMMs read the inputs' own dtype: nothing is upcast. Normalisation goes into a copy
    (``normalize_rows``, which saves no float32 copy for the backward); with Matryoshka prefixes the
    rows stay raw (each prefix has its own norms, ``row_stats_hybrid``)."""
    if options.normalize and options.matryoshka_dims is None:
        return [normalize_rows(x) for x in embeddings]
    return list(embeddings)


def row_stats_hybrid(rows: Rows, options: LossOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """The hybrid backend's ``row_stats``: the [A, n] float32 log-partitions (``hybrid_row_lse_op``)
    and the [n] positive logits ``scale * q_i . d_i`` (torch, in float32); with Matryoshka prefixes
    [K, A, n] and [K, n], every prefix in one pass (each normalised by its own inverse norms, from
    ``prefix_inverse_norms`` with autograd, when ``normalize``)."""
    q, d, scale = rows.q, rows.d, rows.scale
    if not isinstance(scale, torch.Tensor):
        scale = torch.full((), scale, dtype=torch.float32, device=q.device)
    q_all, d_all = (None, None) if rows.shared else (rows.q_all, rows.d_all)
    n_all = rows.n_all if rows.n_all is not None and rows.n_all.shape[1] > 0 else None
    budget = options.chunk_bytes if options.chunk_bytes is not None else CHUNK_BYTES
    dims = options.matryoshka_dims

    def inverse(x: torch.Tensor | None) -> torch.Tensor | None:
        return prefix_inverse_norms(x, dims) if dims is not None and options.normalize and x is not None else None

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
        None if dims is None else list(dims),
        *(inverse(x) for x in (q, d, q_all, d_all, n_all)),
    )
    if dims is not None:
        return lse, prefix_dots(q, d, dims, options.normalize) * scale.float()
    pos = (q.float() * d.float()).sum(-1) * scale.float()
    return lse[0], pos
