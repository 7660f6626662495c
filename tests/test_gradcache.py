"""samtone_kernels.gradcache: cached (GradCache) steps give the uncached step's gradients, dropout and
autocast included, and backward-time behaviour (scaling, DDP's no_sync) is that of an ordinary loss."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from samtone_kernels import SamToNeLoss
from samtone_kernels.gradcache import GradCache, split_batch

N_PAIRS, N_HARD, D_IN, D_OUT = 7, 2, 5, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)


def _tower(seed: int, dropout: float = 0.3, dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(D_IN, 8),
        torch.nn.Tanh(),
        torch.nn.Dropout(dropout),
        torch.nn.Linear(8, D_OUT),
        torch.nn.Dropout(dropout),
    ).to(dtype)


def _batch(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(N_PAIRS, D_IN, generator=g, dtype=dtype),
        torch.randn(N_PAIRS, D_IN, generator=g, dtype=dtype),
        torch.randn(N_PAIRS * N_HARD, D_IN, generator=g, dtype=dtype),
    )


def _step(query_tower, doc_tower, loss_fn, batch, mini_batch_size, cached: bool, seed: int, scale: float = 1.0):
    """One step's loss and gradients; the uncached step embeds the same mini-batches, in the same
    order, with gradients, so both draw the same dropout masks."""
    modules = [query_tower, doc_tower, loss_fn]
    for m in modules:
        m.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    towers = (query_tower, doc_tower, doc_tower)
    if cached:
        cache = GradCache(mini_batch_size)
        q, d, n = (cache.embed(t, x) for t, x in zip(towers, batch))
    else:
        q, d, n = (torch.cat([t(c) for c in x.split(mini_batch_size)]) for t, x in zip(towers, batch))
    loss = loss_fn(q, d, n.reshape(N_PAIRS, N_HARD, D_OUT))
    (scale * loss).backward()
    grads = {f"{i}.{name}": p.grad.clone() for i, m in enumerate(modules) for name, p in m.named_parameters()}
    return loss.detach(), grads


def _loss_fn():
    return SamToNeLoss(
        0.1, learnable_temperature=True, directions=("q2d", "q2q", "d2q", "d2d"), normalize=True
    ).double()


def test_gradients_equal_the_uncached_step_with_dropout():
    query_tower, doc_tower, loss_fn, batch = _tower(0), _tower(1), _loss_fn(), _batch()
    loss_ref, ref = _step(query_tower, doc_tower, loss_fn, batch, 3, cached=False, seed=5)
    loss, got = _step(query_tower, doc_tower, loss_fn, batch, 3, cached=True, seed=5)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-13, atol=0)
    assert got.keys() == ref.keys() and any("log_temperature" in k for k in got)  # the loss's own parameter too
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-11, atol=1e-13, msg=name)
    # The masks matter: another seed gives other gradients, so the equality above is the replay's doing.
    _, other = _step(query_tower, doc_tower, loss_fn, batch, 3, cached=False, seed=6)
    assert not torch.allclose(other["0.0.weight"], ref["0.0.weight"])


def test_backward_scaling_reaches_every_gradient():
    """A scaled loss (gradient accumulation, AMP's GradScaler) scales the replayed gradients too, and
    a retained graph replays again on a second backward, as an uncached graph would accumulate."""
    query_tower, doc_tower, loss_fn, batch = _tower(0), _tower(1), _loss_fn(), _batch()
    _, ref = _step(query_tower, doc_tower, loss_fn, batch, 4, cached=True, seed=5)
    _, got = _step(query_tower, doc_tower, loss_fn, batch, 4, cached=True, seed=5, scale=0.25)
    for name in ref:
        torch.testing.assert_close(got[name], 0.25 * ref[name], rtol=1e-12, atol=1e-15, msg=name)

    query_tower.zero_grad()
    torch.manual_seed(5)
    q = GradCache(4).embed(query_tower, batch[0])
    loss = q.square().sum()
    loss.backward(retain_graph=True)
    once = query_tower[0].weight.grad.clone()
    loss.backward()
    torch.testing.assert_close(query_tower[0].weight.grad, 2 * once, rtol=1e-13, atol=0)


def test_autocast_is_replayed():
    """Step 1 under CPU autocast (bfloat16), backward outside it: the replay runs under the same
    autocast, so the gradients are the autocast step's, not a float32 re-encoding's. (Without the
    weight-cast cache: with it, the uncached step sums a weight's bfloat16 gradient over its uses in
    bfloat16, and the cached one over its replays in float32.)"""
    query_tower, doc_tower = _tower(0, dtype=torch.float32), _tower(1, dtype=torch.float32)
    loss_fn = SamToNeLoss(0.1, directions=("q2d", "q2q"), normalize=True)
    batch = _batch(torch.float32)

    def grads(cached: bool, autocast: bool):
        for m in (query_tower, doc_tower):
            m.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
            if cached:
                cache = GradCache(3)
                q, d = cache.embed(query_tower, batch[0]), cache.embed(doc_tower, batch[1])
            else:
                q = torch.cat([query_tower(c) for c in batch[0].split(3)])
                d = torch.cat([doc_tower(c) for c in batch[1].split(3)])
        loss_fn(q.float(), d.float()).backward()
        return torch.cat([p.grad.flatten() for m in (query_tower, doc_tower) for p in m.parameters()])

    reference, cached, float32 = grads(False, True), grads(True, True), grads(False, False)
    scale = reference.abs().max()
    assert (cached - reference).abs().max() <= 1e-6 * scale
    assert (float32 - reference).abs().max() > 1e-3 * scale  # what a replay without autocast would get


def test_without_gradients_it_is_the_encoder():
    tower, (x, _, _) = _tower(0), _batch()
    tower.eval()
    with torch.no_grad():
        out = GradCache(3).embed(tower, x)
    assert out.grad_fn is None and not out.requires_grad
    torch.testing.assert_close(out, torch.cat([tower(c) for c in x.split(3)]), rtol=0, atol=0)


def test_mapping_and_presplit_inputs():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 3).double()
    calls = []

    def encoder(features):
        calls.append(features["input_ids"].shape[0])
        assert features["tag"] == "text" and "hidden" not in features
        features["hidden"] = emb(features["input_ids"])  # as sentence-transformers' modules do
        return (features["hidden"] * features["mask"][..., None]).sum(1)

    features = {"input_ids": torch.randint(0, 10, (5, 4)), "mask": torch.ones(5, 4, dtype=torch.float64), "tag": "text"}
    parts = split_batch(features, 2)
    assert [p["input_ids"].shape[0] for p in parts] == [2, 2, 1] and all(p["tag"] == "text" for p in parts)
    cache = GradCache()  # no mini_batch_size: the inputs come split
    out = cache.embed(encoder, parts)
    assert calls == [2, 2, 1] and all("hidden" not in p for p in parts)  # step 1's activations were not kept
    (out**2).sum().backward()
    assert calls == [2, 2, 1, 1, 2, 2]  # re-encoded in backward, one mini-batch at a time, last first
    expected = emb.weight.grad.clone()
    emb.zero_grad()
    (encoder(dict(features)) ** 2).sum().backward()
    torch.testing.assert_close(emb.weight.grad, expected, rtol=1e-13, atol=1e-14)


def test_no_sync_wraps_every_replay_but_the_last():
    state = {"no_sync": False}
    seen = []

    @contextmanager
    def no_sync():
        state["no_sync"] = True
        try:
            yield
        finally:
            state["no_sync"] = False

    tower = _tower(0)

    def encoder(x):
        if torch.is_grad_enabled():
            seen.append(state["no_sync"])
        return tower(x)

    cache = GradCache(3, no_sync=no_sync)
    q, d = cache.embed(encoder, _batch()[0]), cache.embed(encoder, _batch()[1])
    (q * d).sum().backward()
    assert seen == [True] * 5 + [False]  # 2 x 3 mini-batches; the last replay synchronises
    # A graph dropped without backward leaves nothing pending: the next step syncs once again.
    cache.embed(encoder, _batch()[0])
    seen.clear()
    cache.embed(encoder, _batch()[1]).sum().backward()
    assert seen == [True, True, False]


def test_errors():
    with pytest.raises(ValueError, match="mini_batch_size"):
        GradCache(0)
    with pytest.raises(ValueError, match="mini_batch_size"):
        split_batch(torch.zeros(3, 2), 0)
    with pytest.raises(ValueError, match="mini_batch_size"):
        GradCache().embed(torch.nn.Identity(), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"inputs\['b'\]"):
        split_batch({"a": torch.zeros(3, 2), "b": torch.zeros(4, 2)}, 2)
    with pytest.raises(TypeError, match="inputs"):
        split_batch([torch.zeros(3)], 2)

    calls = []
    lin = torch.nn.Linear(2, 2)

    def shifty(x):  # not replayable: another shape the second time
        calls.append(1)
        return lin(x) if len(calls) == 1 else lin(x)[:, :1]

    out = GradCache(4).embed(shifty, torch.zeros(3, 2))
    with pytest.raises(RuntimeError, match="same forward twice"):
        out.sum().backward()


def test_frozen_encoder_gets_no_gradient():
    tower = _tower(0).requires_grad_(False)
    x = _batch()[0]
    out = GradCache(3).embed(tower, x)
    out.sum().backward()  # replays, finds nothing to backpropagate into
    assert all(p.grad is None for p in tower.parameters())
