"""The kernels survive the autotuner: the first call of a shape, which benchmarks every config by
launching it several times on the live buffers, gives the same values and gradients as a later call
that uses the cached choice.

Under the interpreter the kernels have one config and the autotuner never benchmarks. Here every
autotuned kernel gets two configs and a stand-in for ``do_bench`` that launches each config twice
(the GPU benchmark launches it many times), so a kernel that reads what an earlier launch wrote
(adding into its output) gives a different first answer. Every flag of the launch plan takes each
of its values: each direction set, groups, hard negatives, normalisation, hardness weighting, and a
gathered batch's anchor and candidate launches.
"""

from __future__ import annotations

import pytest
import torch
import triton

from helpers import DEVICE, DIRECTION_SETS, HARDNESS_MODES, JOINT_ONLY_SETS
from samtone_kernels import _triton, fused_samtone_loss
from samtone_kernels._contract import Rows
from samtone_kernels._options import check_options

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="the interpreter's autotuner path (GPU: the real one)")


@pytest.fixture
def benchmarked(monkeypatch):
    """Two configs per kernel, a fresh tuning cache, and a do_bench that launches each config twice.
    Returns the list of benchmark calls, so a test can check tuning did happen."""
    calls = []

    def do_bench(kernel_call, quantiles=None):
        for _ in range(2):
            kernel_call()
        calls.append(1)
        return [float(len(calls) % 3)] * 3  # a different winner from one key to the next

    for kernel, grad in zip(_triton.AUTOTUNED, (False, True)):  # tiles the interpreter runs at any size
        # The tuner sees two configs: the two walks of the GPU configs (configs.GPU_TILES); for the
        # backward the first takes its sweeps transposed (sm_90's second swept config; the
        # interpreter's default config, which the other tests run, sweeps plainly) and the second is
        # resident (configs.RESIDENT_TILES: the tests' D = 9 is within its tile).
        configs = [
            triton.Config(
                {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16, "PAIRED": paired}
                | ({"SPAN": span, "RESIDENT": w == 8, "TRANSPOSED": w == 4} if grad else {}),
                num_warps=w,
                num_stages=1,
                maxnreg=255 if grad and w == 8 else None,  # (a register cap, as the GPU's resident configs)
            )
            for w, paired, span in ((4, True, 2), (8, False, 1))
        ]
        monkeypatch.setattr(kernel, "configs", configs)
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setitem(kernel.__dict__, "do_bench", do_bench)  # over the cached_property (no driver here)
    monkeypatch.setattr(_triton.launch, "POISON_OUTPUTS", True)
    return calls


def _step(inputs, **kwargs):
    tau = torch.tensor(0.2, requires_grad=True)
    loss = fused_samtone_loss(*inputs, temperature=tau, backend="triton", reduction="sum", **kwargs)
    return [loss.detach(), *torch.autograd.grad(loss, [*inputs, tau])]


# Every flag of the plan takes each value somewhere: direction sets (joint-only ones too), groups,
# hard negatives, normalisation, hardness weighting.
VARIANTS = [
    (dirs, i % 2 == 1, HARDNESS_MODES[i % 3] if i % 2 == 0 else None)
    for i, dirs in enumerate(DIRECTION_SETS + JOINT_ONLY_SETS)
]


@pytest.mark.parametrize("directions,normalize,hardness_mode", VARIANTS, ids=str)
def test_first_call_equals_cached_call(benchmarked, directions, normalize, hardness_mode):
    g = torch.Generator().manual_seed(len(directions))
    n_pairs, dim = 17, 9  # two row tiles
    groups = torch.randint(0, 9, (n_pairs,), generator=g)
    inputs = [
        torch.randn(*shape, generator=g).requires_grad_()
        for shape in [(n_pairs, dim), (n_pairs, dim), (n_pairs, 1, dim)]
    ]
    kwargs = dict(
        directions=directions,
        group_ids=groups if normalize else None,
        normalize=normalize,
        partition="joint" if directions in JOINT_ONLY_SETS else "per_anchor",
    )
    if hardness_mode:
        kwargs.update(hardness_mode=hardness_mode, hardness_strength=3.0)
    first = _step(inputs, **kwargs)
    assert benchmarked, "the autotuner did not benchmark"
    tuned = len(benchmarked)
    cached = _step(inputs, **kwargs)
    assert len(benchmarked) == tuned, "the second call re-tuned"
    for a, b in zip(first, cached):
        assert torch.equal(a, b), (directions, normalize, (a - b).abs().max())


def test_first_call_equals_cached_call_for_a_gathered_slice(benchmarked):
    """Anchors that are pairs 5..21 of the candidates: the anchor and candidate launches of a
    gathered batch."""
    options = check_options(
        directions=("q2d", "q2q", "d2q", "d2d"),
        partition="per_anchor",
        doc_anchor_weight=1.0,
        normalize=False,
        reduction="mean",
    )
    g = torch.Generator().manual_seed(7)
    q, d = (torch.randn(29, 9, generator=g).requires_grad_() for _ in range(2))
    n = torch.randn(29, 1, 9, generator=g).requires_grad_()
    groups = torch.randint(0, 5, (29,), generator=g)
    results = []
    for _ in range(2):
        scale = torch.tensor(3.0, requires_grad=True)
        lse, pos = _triton.row_stats_triton(Rows(q[5:22], d[5:22], q, d, n, scale, groups, 5), options)
        stats = torch.cat([lse, pos[None]])
        weights = torch.linspace(-0.5, 1.5, stats.numel()).view_as(stats)
        results.append([stats.detach(), *torch.autograd.grad((stats * weights).sum(), [q, d, n, scale])])
    assert benchmarked
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("arch", [90, 80, 89, 86, None])
def test_a_gpu_is_offered_its_architectures_configs_only(monkeypatch, arch):
    """Each GPU is offered its architecture's configs only: one for the forward and, for the backward,
    the swept walk (on sm_90 also with its products transposed) beside the resident ones, which serve
    D <= their BLOCK_D. Where no resident config serves D the backward runs ``wide_grad_kernel`` over
    the others: on sm_90 the two sweeps, timed against each other; elsewhere one config, so that the
    autotuner never benchmarks (triton 3.6 benchmarks even a pruned list of one: 7+ launches and an
    L2 flush per key); without a GPU every architecture's configs are listed."""
    from samtone_kernels._triton import configs, kernels

    monkeypatch.setattr(configs, "INTERPRETING", False)
    for grad in (False, True):
        offered = configs.configs(grad=grad, arch=arch)
        tiles = configs.tiles_for(arch, grad) if arch else {t for a in (90, 80, 89) for t in configs.tiles_for(a, grad)}
        assert len(offered) == len(tiles)
        assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_D"], c.num_warps) for c in offered} == {
            t[:4] for t in tiles
        }
        if arch:
            full = [configs.full_tile(t) for t in tiles]
            assert [c.kwargs.get("RESIDENT", False) for c in offered] == [t[7] for t in full]
            assert [c.maxnreg for c in offered] == [t[8] for t in full]  # (the resident tiles' register caps)
            assert [c.kwargs.get("TRANSPOSED", False) for c in offered] == [t[9] for t in full]
            assert sum(t[9] for t in full) == (grad and arch == 90)  # (configs.TRANSPOSED_TILES)
    if arch is not None:
        assert len(configs.configs(grad=False, arch=arch)) == 1
        grad = configs.configs(grad=True, arch=arch)
        monkeypatch.setattr(kernels.grad_kernel, "configs", grad)
        resident = [c.kwargs["BLOCK_D"] for c in grad if c.kwargs["RESIDENT"]]
        assert sorted(resident) == ([64, 128, 256] if arch in (90, 80, 89) else [])  # (configs.RESIDENT_TILES)
        swept = [c for c in grad if not c.kwargs["RESIDENT"]]
        assert [c.kwargs["TRANSPOSED"] for c in swept] == ([False, True] if arch == 90 else [False])
        if not resident:
            assert kernels.grad_launcher(64, 4096) is kernels.grad_kernel and len(grad) == 1
            return
        assert kernels.grad_launcher(max(resident), 4096) is kernels.grad_kernel
        assert kernels.grad_launcher(max(resident), 16) is kernels.wide_grad_kernel  # (rows < every resident tile)
        wide = kernels.grad_launcher(max(resident) + 1, 4096)
        assert wide is kernels.wide_grad_kernel and wide.configs == swept


def test_a_resident_config_serves_d_within_its_tile_only(monkeypatch):
    """The prune drops a resident config narrower than D (it would compute the first BLOCK_D columns
    only), keeps it where D fits; a pinned one (a list of one, which the autotuner does not prune)
    narrower than D raises before any launch."""
    from samtone_kernels._triton import configs

    resident = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16, "RESIDENT": True}, num_warps=4)
    swept = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16, "RESIDENT": False}, num_warps=4)
    x = torch.zeros(4, 20)
    args = dict(X=x, BUF=x, n_rows=20, n_cols=20)
    assert configs._prune([resident, swept], dict(args, dim=17)) == [swept]
    assert configs._prune([resident, swept], dict(args, dim=16)) == [resident, swept]
    assert configs._prune([swept, resident], dict(args, dim=100)) == [swept]  # (the fallback too)

    # Where every tile is larger than the problem: the narrowest in D that serves it, then the smallest.
    def tile(bm, bd, resident):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": 16, "BLOCK_D": bd, "RESIDENT": resident}, num_warps=4)

    widest, larger, narrowest = tile(16, 64, False), tile(32, 32, False), tile(16, 32, True)
    assert configs._prune([widest, larger, narrowest], dict(args, dim=8)) == [narrowest]
    monkeypatch.setenv("SAMTONE_TRITON_CONFIG", "16,16,16,4,1,0,1,1")
    pinned = configs.configs(grad=True)
    assert pinned[0].kwargs["RESIDENT"] and configs.configs(grad=False)[0].kwargs.get("RESIDENT") is None
    configs.check_fits(pinned, 16)
    with pytest.raises(ValueError, match="BLOCK_D >= D"):
        configs.check_fits(pinned, 17)
    # A ninth field pins the register cap (0: none), a tenth the transposed sweep (not with the
    # resident walk, which has no sweep); anything else is refused before a launch.
    for cap, expected in (("128", 128), ("0", None)):
        monkeypatch.setenv("SAMTONE_TRITON_CONFIG", "16,16,16,4,1,0,1,1," + cap)
        assert configs.configs(grad=True)[0].maxnreg == expected and configs.configs(grad=False)[0].maxnreg is None
    monkeypatch.setenv("SAMTONE_TRITON_CONFIG", "16,16,16,4,1,1,2,0,0,1")
    assert configs.configs(grad=True)[0].kwargs["TRANSPOSED"] and "TRANSPOSED" not in configs.configs(False)[0].kwargs
    bad_values = ("16,16,16,4,1,0,1,1,300", "16,16,16,4,1,0,1,1,8", "16,16,16,4,1,0,1,2", "16,16,16,4")
    for bad in (*bad_values, "16,16,16,4,1,0,1,1,0,1", "16,16,16,4,1,0,1,0,0,2"):
        monkeypatch.setenv("SAMTONE_TRITON_CONFIG", bad)
        with pytest.raises(ValueError, match="SAMTONE_TRITON_CONFIG.*MAXNREG.*TRANSPOSED"):
            configs.configs(grad=True)
