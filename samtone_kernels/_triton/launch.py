"""The launchers of the fused kernels: the tensors of one call and their kernel arguments (``Batch``),
the forward's ``lse_kernel`` launches (``forward``) and the backward's ``grad_kernel`` and
``epilogue_kernel`` launches, one gradient per tensor (``Backward``). The launches come from
``plan``; ``ops`` wraps these in custom ops.
"""

from __future__ import annotations

import math

import torch
import triton

from .. import _plan as plan
from .._rows import inverse_norms, row_chunks
from .configs import bucket
from .epilogue import EPILOGUE, epilogue_kernel
from .kernels import grad_launcher, lse_kernel

# Set by tests: fill every buffer the kernels must write with NaN before launching them.
POISON_OUTPUTS = False

#: A gradient launch after the first holds its float32 buffer for a block of rows at most this many
#: copies of the tensor in its own dtype (16-bit inputs: half the rows at a time), so that beside the
#: gradients already made only one more copy is alive. The first launch has nothing beside it.
LATER_BUFFER_COPIES = 1.0


def _precision(dtype: torch.dtype) -> str:
    """float32 dots follow torch's matmul setting (TF32 only if the user allowed it)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # ignored by tl.dot for 16-bit inputs


def _empty(shape, like: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=like.device)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


def _as3(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 3 else x.unsqueeze(1)


def _strided(name: str, x3: torch.Tensor) -> dict:
    """The kernel arguments of a [rows, K, D] tensor: ``NAME`` and ``stride_name_{row,block,dim}``."""
    return {
        name.upper(): x3,
        f"stride_{name}_row": x3.stride(0),
        f"stride_{name}_block": x3.stride(1),
        f"stride_{name}_dim": x3.stride(2),
    }


class Batch:
    """The tensors of one call by their plan names, their inverse norms, and the kernels' arguments.

    ``q, d`` [n, D] are the anchors, pairs ``offset ..`` of the candidates ``q_all, d_all`` [N, D]
    and ``n_all`` [N, H, D] (the same tensors as the anchors when ``shared``). With ``normed``
    (NORMED) the kernels scale logit tiles by float32 inverse norms: ``norm(name)`` [K, rows]
    (row-major [rows, K] for the epilogue: ``norm(name, rows_major=True)``); otherwise every norm
    argument is a placeholder the kernels never read.
    """

    def __init__(
        self, q, d, q_all, d_all, n_all, groups, offset, normed, hardness=0.0, hardness_mode="", scale=None, margin=None
    ):
        self.shared = q_all is None
        self.hardness = float(hardness) if hardness_mode else 0.0  # alpha of the hardness penalty
        self.hardness_mode = hardness_mode or None
        self.tensors = {
            "q": q,
            "d": d,
            "q_all": q if self.shared else q_all,
            "d_all": d if self.shared else d_all,
            "n_all": n_all,
        }
        self.tensors["n"] = n_all
        self.n_anchor, self.dim = q.shape
        self.n_cand = self.tensors["q_all"].shape[0]
        self.n_hard = 0 if n_all is None else n_all.shape[1]
        self.offset = offset
        self.normed = normed
        self.placeholder = torch.ones((), dtype=torch.float32, device=q.device)
        self.groups, self.has_groups = (groups.contiguous(), True) if groups is not None else (q, False)
        self._norms: dict[str, torch.Tensor] = {}
        if normed:
            for name in ("q", "d") if self.shared else ("q", "d", "q_all", "d_all"):
                self._norms[name] = inverse_norms(self.tensors[name])
            if self.shared:
                self._norms["q_all"], self._norms["d_all"] = self._norms["q"], self._norms["d"]
            if n_all is not None:
                self._norms["n_all"] = self._norms["n"] = inverse_norms(n_all)  # [N, H]
        self.margin = margin
        self.thresholds = self.placeholder
        if margin is not None:
            self.thresholds = margin_thresholds(
                self.tensors["q_all"],
                self.tensors["d_all"],
                scale,
                margin,
                *((self._norms["q_all"], self._norms["d_all"]) if normed else ()),
            )

    def tensor(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def norm(self, name: str, rows_major: bool = False) -> torch.Tensor:
        if not self.normed:
            return self.placeholder
        r = self._norms[name]
        return r if rows_major or r.dim() == 1 else r.t().contiguous()

    def segments(self, anchors: bool) -> dict:
        """Kernel arguments of the Q, D and hard-negative segments: the candidates, or (``anchors``)
        the local anchors, whose hard negatives are never walked (a valid pointer stands in)."""
        q, d = (self.tensors["q"], self.tensors["d"]) if anchors else (self.tensors["q_all"], self.tensors["d_all"])
        rq, rd = (self.norm("q"), self.norm("d")) if anchors else (self.norm("q_all"), self.norm("d_all"))
        neg = self.tensors["n_all"]
        if anchors or neg is None:
            neg, rneg = d.unsqueeze(1), self.placeholder
        else:
            rneg = self.norm("n_all")
        return dict(
            Q=q,
            stride_q_row=q.stride(0),
            stride_q_dim=q.stride(1),
            Q_INV_NORMS=rq,
            D=d,
            stride_d_row=d.stride(0),
            stride_d_dim=d.stride(1),
            D_INV_NORMS=rd,
            NEG=neg,
            stride_neg_row=neg.stride(0),
            stride_neg_k=neg.stride(1),
            stride_neg_dim=neg.stride(2),
            NEG_INV_NORMS=rneg,
        )

    def roles(self, launch: plan.Launch) -> dict[str, int]:
        """The launch's ``Q_ROLE``, ``D_ROLE``, ``N_ROLE`` for this batch (``plan.Launch.roles``)."""
        return launch.roles(
            self.has_groups, self.hardness_mode if self.hardness else None, self.n_hard > 0, self.margin is not None
        )


def margin_thresholds(
    q: torch.Tensor, d: torch.Tensor, scale: torch.Tensor, margin: float, r_q=None, r_d=None
) -> torch.Tensor:
    """[N] float32 logit thresholds of the false-negative margin, ``scale * (q_i . d_i + margin)`` per
    pair (the unit vectors' dot product when inverse norms ``r_q``, ``r_d`` [N] are given),
    in bounded chunks: an entry whose logit exceeds its anchor pair's threshold is a presumed false
    negative. A constant: no gradient flows through it."""
    out = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
    for c in row_chunks(q):
        dots = (q[c].float() * d[c].float()).sum(-1)
        if r_q is not None:
            dots = dots * r_q[c] * r_d[c]
        out[c] = (dots + margin) * scale.detach().float()
    return out


def _grid(n_rows: int, blocks: int = 1):
    return lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]), blocks)


def forward(batch: Batch, directions: tuple[str, ...], scale: torch.Tensor) -> torch.Tensor:
    """[A + 1, n] float32: ``lse_kernel`` over each launch of ``plan.forward_launches`` (the anchors'
    log-partitions), and last the positive logits ``scale * q_i . d_i``."""
    q, d = batch.tensor("q"), batch.tensor("d")
    launches = plan.forward_launches(directions)
    stats = _empty((len(launches) + 1, batch.n_anchor), q)
    segments = batch.segments(anchors=False)
    for a, launch in enumerate(launches):
        x = batch.tensor(launch.rows)
        lse_kernel[_grid(batch.n_anchor)](
            X=x,
            stride_x_row=x.stride(0),
            stride_x_dim=x.stride(1),
            X_INV_NORMS=batch.norm(launch.rows),
            **segments,
            GROUP_IDS=batch.groups,
            THRESHOLDS=batch.thresholds,
            SCALE=scale,
            LSE=stats[a],
            n_rows=batch.n_anchor,
            n_cols=batch.n_cand,
            row_offset=batch.offset,
            dim=batch.dim,
            n_hard=batch.n_hard,
            rows_bucket=bucket(batch.n_anchor),
            cols_bucket=bucket(batch.n_cand),
            hardness=batch.hardness,
            **batch.roles(launch),
            NORMED=batch.normed,
            PRECISION=_precision(q.dtype),
        )
    r_q, r_d = batch.norm("q"), batch.norm("d")
    for c in row_chunks(q):  # float32 products in bounded chunks (no float32 copy of q or d)
        qc, dc = q[c].float(), d[c].float()
        if batch.normed:
            qc, dc = qc * r_q[c].unsqueeze(-1), dc * r_d[c].unsqueeze(-1)
        stats[-1, c] = (qc * dc).sum(-1) * scale
    return stats


class Backward:
    """The state of one backward call: upstream weights rescaled for the kernels, and one gradient
    per launch (``run``), made by ``grad_kernel`` into a float32 buffer and finished by the epilogue."""

    def __init__(self, batch: Batch, grad_stats, stats, scale, n_stats: int, want_dots: bool):
        self.batch = batch
        lse, grad_lse = stats[:n_stats].contiguous(), grad_stats[:n_stats]
        # The positive logit p_i = scale * q_i . d_i: dF/dq_i += c_i d_i and dF/dd_i += c_i q_i, with
        # c_i = scale * grad_p_i, added by the epilogue of q's and d's gradients.
        self.pos_coef = (grad_stats[n_stats].float() * scale).contiguous()
        # Upstream weights are rescaled to max |w| = 1 before the kernels multiply them into P and cast
        # to the input dtype (float16 would flush 1/N-sized products to zero); the factor comes back in
        # the epilogue.
        w_max = grad_lse.abs().amax()
        w = (grad_lse * torch.where(w_max > 0, 1.0 / w_max, torch.zeros_like(w_max))).float().contiguous()
        self.stats = {"q": (lse[0], w[0]), "d": (lse[n_stats - 1], w[n_stats - 1])}  # "d": read only with doc anchors
        self.factor = (scale * w_max).float().reshape(1)
        self.scale = scale
        self.precision = _precision(batch.tensor("q").dtype)
        self.want_dots = want_dots
        self.dots = torch.zeros((), dtype=torch.float32, device=scale.device)
        self.made = 0  # launches finished: the first one's buffer holds every row

    def run(self, launch: plan.Launch) -> torch.Tensor:
        """The gradient of ``launch.rows``, in its dtype. Rows go in blocks whose float32 buffer is at
        most ``LATER_BUFFER_COPIES`` copies of the tensor, except for the first launch."""
        x = self.batch.tensor(launch.rows)
        x3 = _as3(x)
        n_rows, k = x3.shape[0], x3.shape[1]
        out = torch.empty_like(x) if x.dtype == torch.float32 else _empty(x.shape, x, x.dtype)
        block = n_rows
        if self.made and x.dtype != torch.float32:
            block = max(1, math.floor(n_rows * LATER_BUFFER_COPIES * x.element_size() / 4))
        for r0 in range(0, n_rows, block):
            rows = slice(r0, min(n_rows, r0 + block))
            buf = out[rows] if x.dtype == torch.float32 else None  # float32: the gradient is the buffer
            if buf is None or POISON_OUTPUTS:
                buf = _empty(x3[rows].shape, x) if buf is None else buf.fill_(float("nan"))
            # Without NORMED the grad kernel's last sweep writes the gradient itself (FUSED); with it,
            # the normalisation's row sums need the whole buffer first, so the epilogue finishes it.
            fused = bool(launch.finish(self.batch.normed, self.want_dots) & plan.FUSED)
            row_dots = _empty(((rows.stop - rows.start) * k,), x) if self.want_dots else None
            if launch.walks:
                self._grad(launch, x, out, rows, buf, row_dots)
            else:  # the local documents of a gathered batch without d2q: the positive logit only
                buf.zero_()
            if not fused:
                self._finish(launch, buf, x, out, rows, row_dots)
            if self.want_dots:
                self.dots = self.dots + row_dots.sum()
            del buf
        self.made += 1
        return out

    def _partner(self, launch: plan.Launch, x: torch.Tensor, rows: slice):
        """(the partner's name, its rows P, their inverse norms, the coefficients pos) of the positive
        logit's term ``pos_i * unit(P_i)`` in an anchor's gradient (P = d for q, q for d); for any other
        tensor ``None`` and valid pointers that are never read."""
        b = self.batch
        partner = {"q": "d", "d": "q"}.get(launch.rows)
        if partner is None:
            return None, _as3(x[rows]), b.placeholder, b.placeholder
        r_p = b.norm(partner)[rows] if b.normed else b.placeholder
        return partner, b.tensor(partner)[rows], r_p, self.pos_coef[rows]

    def _grad(
        self,
        launch: plan.Launch,
        x: torch.Tensor,
        out: torch.Tensor,
        rows: slice,
        buf: torch.Tensor,
        row_dots: torch.Tensor | None,
    ) -> None:
        """``grad_kernel`` over rows ``rows`` of the launch's tensor: into the float32 ``buf``, and when
        ``launch.finish`` says FUSED on into ``out`` (its last sweep writes the gradient, and
        ``row_dots``)."""
        b = self.batch
        r0 = rows.start
        x3, buf3, out3 = _as3(x[rows]), _as3(buf), _as3(out[rows])
        n_rows, blocks = x3.shape[0], x3.shape[1]
        lse_r, w_r = self.stats[launch.anchor] if launch.anchor else self.stats["q"]  # read only with a row walk
        lse_q, w_q = self.stats["q"]
        lse_d, w_d = self.stats["d"]
        rx = b.norm(launch.rows)
        if b.normed:
            rx = (rx[:, r0 : r0 + n_rows] if rx.dim() == 2 else rx[r0 : r0 + n_rows]).contiguous()
        row_offset = r0 + (b.offset if launch.rows in ("q", "d") else 0)
        col_offset = b.offset if launch.candidates_are_anchors else 0
        n_cols = b.n_anchor if launch.candidates_are_anchors else b.n_cand
        _, p, _, pos = self._partner(launch, x, rows)
        grad_launcher(b.dim, n_rows)[_grid(n_rows, blocks)](
            **_strided("out", out3),
            **_strided("buf", buf3),
            **_strided("x", x3),
            X_INV_NORMS=rx,
            **b.segments(launch.candidates_are_anchors),
            GROUP_IDS=b.groups,
            THRESHOLDS=b.thresholds,
            SCALE=self.scale,
            ROW_LSE=lse_r[r0:] if launch.anchor else lse_r,
            ROW_W=w_r[r0:] if launch.anchor else w_r,
            Q_LSE=lse_q,
            Q_W=w_q,
            D_LSE=lse_d,
            D_W=w_d,
            POS_ROWS=p,
            stride_pos_row=p.stride(0),
            stride_pos_dim=p.stride(-1),
            POS_COEF=pos,
            FACTOR=self.factor,
            DOTS_OUT=row_dots if row_dots is not None else b.placeholder,
            n_rows=n_rows,
            n_cols=n_cols,
            row_offset=row_offset,
            col_offset=col_offset,
            dim=b.dim,
            n_hard=b.n_hard,
            rows_bucket=bucket(n_rows),
            cols_bucket=bucket(n_cols),
            hardness=b.hardness,
            **b.roles(launch),
            FINISH=launch.finish(b.normed, row_dots is not None),
            NORMED=b.normed,
            PRECISION=self.precision,
        )

    def _finish(
        self,
        launch: plan.Launch,
        buf: torch.Tensor,
        x: torch.Tensor,
        out: torch.Tensor,
        rows: slice,
        row_dots: torch.Tensor | None,
    ) -> None:
        """Rows ``rows`` of x's gradient from their float32 buffer (``epilogue_kernel``: the factor,
        the positive logit's term for the anchors q and d, the normalisation), written over the
        buffer for float32; <unit(x), grad> per row into ``row_dots``."""
        b = self.batch
        partner, p, r_p, pos = self._partner(launch, x, rows)
        x3, buf3, out3 = _as3(x[rows]), _as3(buf), _as3(out[rows])
        n_x, k = x3.shape[0], x3.shape[1]
        rx = b.norm(launch.rows, rows_major=True)
        if b.normed:
            rx = rx[rows].contiguous()
        epilogue_kernel[(triton.cdiv(n_x * k, EPILOGUE["BLOCK_R"]),)](
            **_strided("out", out3),
            **_strided("buf", buf3),
            **_strided("x", x3),
            X_INV_NORMS=rx,
            POS_ROWS=p,
            stride_pos_row=p.stride(0),
            stride_pos_dim=p.stride(-1),
            POS_INV_NORMS=r_p,
            POS_COEF=pos,
            FACTOR=self.factor,
            DOTS_OUT=row_dots if row_dots is not None else b.placeholder,
            n_rows=n_x,
            n_seg=k,
            dim=b.dim,
            HAS_PARTNER=partner is not None,
            NORMED=b.normed,
            DOTS_WANTED=row_dots is not None,
            **EPILOGUE,
        )


def outputs(shared: bool, directions) -> dict[str, bool]:
    """Which of (dq, dd, dq_all, dd_all, dn_all) the backward returns with rows (the others come
    back with 0 rows): the tensors some launch owns."""
    owned = {launch.rows for launch in plan.backward_launches(directions, shared)}
    if shared:
        return {"q": True, "d": True, "q_all": False, "d_all": False, "n_all": "n" in owned}
    return {"q": True, "d": True, "q_all": "q_all" in owned, "d_all": "d_all" in owned, "n_all": "n_all" in owned}
