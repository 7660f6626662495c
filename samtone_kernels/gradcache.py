"""GradCache: contrastive training on batches whose encoder activations do not fit in memory.

Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup". An
in-batch contrastive loss couples every pair of the batch, so the batch cannot be split into
independent mini-batches; but the loss only reads the encoders' *embeddings*, which are small. So:

1. embed every mini-batch without gradients, keeping each mini-batch's RNG (and autocast) state;
2. compute the loss on the whole batch of embeddings and backpropagate it to the embeddings;
3. re-embed each mini-batch with gradients under its saved RNG state, so dropout draws the same
   masks, and backpropagate that mini-batch's embedding gradient into the encoder's parameters.

Only one mini-batch of encoder activations is alive at a time, and the parameter gradients equal
those of the uncached step (up to float rounding: the sum over mini-batches is taken in another
order). Here step 3 happens inside ``loss.backward()``: the embeddings ``GradCache.embed`` returns
carry no graph into the encoder, but a gradient that reaches a mini-batch of them re-encodes that
mini-batch and backpropagates through it. So a training loop computes the loss as usual, on the
full batch, and calls ``loss.backward()``; loss scaling (AMP's ``GradScaler``), gradient
accumulation, several losses summed and parameters inside the loss (a learnable temperature) all
behave as without caching::

    from samtone_kernels import SamToNeLoss
    from samtone_kernels.gradcache import GradCache

    loss_fn = SamToNeLoss(0.05, directions=("q2d", "q2q"), normalize=True)
    cache = GradCache(mini_batch_size=32)
    for queries_in, docs_in in loader:               # batches of, say, 4096 pairs
        q = cache.embed(query_tower, queries_in)     # [N, D]: no encoder graph is kept
        d = cache.embed(doc_tower, docs_in)
        loss = loss_fn(q, d)
        opt.zero_grad()
        loss.backward()                              # re-encodes each mini-batch of 32
        opt.step()

Requirements on an encoder: the same inputs under the same RNG state give the same embeddings (true
of dropout; not of a module that draws from an RNG of its own), and no state the forward changes
matters to the replay (BatchNorm's running statistics are updated twice per step). A mapping of
inputs is handed to it as a shallow copy, so keys it adds are dropped; it must not modify the
tensors themselves in place.

Autocast is replayed too: ``loss.backward()`` normally runs outside ``torch.autocast``, and an
encoder replayed at another precision than step 1 would get gradients at the wrong point.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Any

import torch

__all__ = ["GradCache", "split_batch"]

Encoder = Callable[[Any], torch.Tensor]


def split_batch(inputs: torch.Tensor | Mapping[str, Any], mini_batch_size: int) -> list[Any]:
    """Split a batch along its first dimension into mini-batches of ``mini_batch_size`` rows.

    Parameters
    ----------
    inputs : [N, ...] tensor, or a mapping of such tensors (e.g. tokenised features)
        In a mapping, every tensor with at least one dimension must have N rows and is sliced;
        0-dim tensors and non-tensor values are passed to every mini-batch unchanged.
    mini_batch_size : int
        Rows per mini-batch (the last may be smaller).

    Returns
    -------
    list
        ``ceil(N / mini_batch_size)`` mini-batches of the type of ``inputs``.
    """
    if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1:
        raise ValueError(f"mini_batch_size: expected an int >= 1, got {mini_batch_size!r}")
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() == 0:
            raise ValueError("inputs: a 0-dim tensor has no batch dimension to split")
        return list(inputs.split(mini_batch_size))
    if isinstance(inputs, Mapping):
        rows = {
            key: value.shape[0] for key, value in inputs.items() if isinstance(value, torch.Tensor) and value.dim() > 0
        }
        if not rows:
            raise ValueError("inputs: the mapping holds no tensor with a batch dimension to split")
        n_rows = next(iter(rows.values()))
        for key, value in rows.items():
            if value != n_rows:
                raise ValueError(f"inputs[{key!r}]: {value} rows, but other tensors have {n_rows}")
        return [
            {key: value[begin : begin + mini_batch_size] if key in rows else value for key, value in inputs.items()}
            for begin in range(0, n_rows, mini_batch_size)
        ]
    raise TypeError(f"inputs: expected a tensor or a mapping of tensors, got {type(inputs).__name__}")


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``obj``, looking into mappings, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _tensors(value)


def _fresh(inputs: Any) -> Any:
    """What the encoder is given: a shallow copy of a mapping, so that keys an encoder adds to its
    features (sentence-transformers' modules write their outputs into them) neither keep step 1's
    activations alive until backward nor reach the replay."""
    return copy.copy(inputs) if isinstance(inputs, Mapping) else inputs


class _RandomState:
    """The CPU generator's state, and that of every accelerator generator the forward may draw from:
    the CUDA devices of the inputs and the current CUDA device (where a model on the GPU fed CPU
    inputs computes), and the MPS generator when an input is on MPS."""

    def __init__(self, inputs: Any) -> None:
        tensors = list(_tensors(inputs))
        devices = {t.device.index for t in tensors if t.device.type == "cuda"}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            devices.add(torch.cuda.current_device())
        self.cuda_devices = sorted(d for d in devices if d is not None)
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.cuda_devices]
        self.mps = torch.mps.get_rng_state() if any(t.device.type == "mps" for t in tensors) else None

    @contextmanager
    def restored(self) -> Iterator[None]:
        """Run the block with the saved states; the generators are as before it afterwards."""
        with torch.random.fork_rng(devices=self.cuda_devices):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.cuda_devices, self.cuda):
                torch.cuda.set_rng_state(state, device)
            outer_mps = None
            if self.mps is not None:
                outer_mps = torch.mps.get_rng_state()
                torch.mps.set_rng_state(self.mps)
            try:
                yield
            finally:
                if outer_mps is not None:
                    torch.mps.set_rng_state(outer_mps)


class _AutocastState:
    """Whether autocast was on, and at which dtype, for the CPU and CUDA, as in torch.utils.checkpoint."""

    def __init__(self) -> None:
        types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        self.settings = [(t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in types]
        self.cache_enabled = torch.is_autocast_cache_enabled()

    def restored(self) -> ExitStack:
        stack = ExitStack()
        for device_type, enabled, dtype in self.settings:
            stack.enter_context(
                torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=self.cache_enabled)
            )
        return stack


class _MiniBatch:
    """One mini-batch embedded in step 1: what it takes to run its forward again, identically."""

    def __init__(self, cache: GradCache, encoder: Encoder, inputs: Any) -> None:
        self.cache = cache
        self.encoder = encoder
        self.inputs = inputs
        self.random_state = _RandomState(inputs)
        self.autocast_state = _AutocastState()


class _Reencode(torch.autograd.Function):
    """Identity on a mini-batch's embeddings whose backward re-encodes the mini-batch (step 3).

    ``token`` is an empty tensor that requires grad, so the output is part of the graph although
    the embeddings were computed without one; it never receives a gradient.
    """

    @staticmethod
    def forward(ctx, token: torch.Tensor, embeddings: torch.Tensor, mini_batch: _MiniBatch) -> torch.Tensor:
        ctx.mini_batch = mini_batch
        return embeddings

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.mini_batch.cache._replay(ctx.mini_batch, grad)
        return None, None, None


class GradCache:
    """Embed batches in mini-batches without keeping the encoder's graph; re-encode in backward.

    Parameters
    ----------
    mini_batch_size : int, optional
        Rows per mini-batch when ``embed`` is given a whole batch to split. Not needed when every
        ``embed`` call gets its inputs already split (a list of mini-batches).
    no_sync : callable returning a context manager, optional
        For ``DistributedDataParallel``: pass the DDP module's ``no_sync``. Every replay but the
        last one pending then runs under it, so gradients are all-reduced once per step. Every
        embedded mini-batch whose graph is alive must take part in the loss, or the last replay
        never comes. Without it, each replay all-reduces (correct, and W times the traffic).

    Examples
    --------
    >>> cache = GradCache(mini_batch_size=2)
    >>> tower = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.1))
    >>> q = cache.embed(tower, torch.randn(5, 4))              # [5, 3], three forwards of <= 2 rows
    >>> d = cache.embed(tower, torch.randn(5, 4))
    >>> loss = -torch.log_softmax(q @ d.T, dim=1).diagonal().mean()
    >>> loss.backward()                                        # six re-encodings, with their dropout
    >>> tower[0].weight.grad.shape
    torch.Size([3, 4])
    """

    def __init__(
        self, mini_batch_size: int | None = None, *, no_sync: Callable[[], AbstractContextManager] | None = None
    ) -> None:
        if mini_batch_size is not None and (
            isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1
        ):
            raise ValueError(f"mini_batch_size: expected an int >= 1 or None, got {mini_batch_size!r}")
        if no_sync is not None and not callable(no_sync):
            raise TypeError(f"no_sync: expected a callable returning a context manager, got {type(no_sync).__name__}")
        self.mini_batch_size = mini_batch_size
        self.no_sync = no_sync
        # Mini-batches embedded with a replay attached and not yet replayed. Weak: a graph that is
        # dropped without a backward takes its mini-batches out of the count.
        self._pending: weakref.WeakSet[_MiniBatch] = weakref.WeakSet()

    def embed(self, encoder: Encoder, inputs: torch.Tensor | Mapping[str, Any] | list | tuple) -> torch.Tensor:
        """Embed a batch, ``mini_batch_size`` rows at a time: [N, D], without the encoder's graph.

        Parameters
        ----------
        encoder : callable
            Maps a mini-batch of inputs to its embeddings [m, D] (an ``nn.Module``, or e.g.
            ``lambda features: model(features)["sentence_embedding"]``).
        inputs : [N, ...] tensor, mapping of [N, ...] tensors, or a list / tuple of mini-batches
            A tensor or mapping is split with ``split_batch``; a list or tuple is taken as the
            mini-batches themselves (any type the encoder accepts).

        Returns
        -------
        Tensor [N, D]
            The embeddings, in input order. With gradients enabled, a gradient reaching rows of
            mini-batch k during backward re-encodes mini-batch k (same RNG and autocast state as
            here, gradients on) and backpropagates into the encoder. With gradients disabled, just
            the embeddings.
        """
        parts = self.embed_mini_batches(encoder, self._mini_batches(inputs))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def embed_mini_batches(self, encoder: Encoder, mini_batches: Iterable[Any]) -> list[torch.Tensor]:
        """Like ``embed`` for inputs already split, returning each mini-batch's embeddings [m_k, D].

        ``mini_batches`` is iterated once, so it may be a progress bar over a list.
        """
        grad_enabled = torch.is_grad_enabled()
        outputs = []
        for inputs in mini_batches:
            record = _MiniBatch(self, encoder, inputs) if grad_enabled else None
            with torch.no_grad():
                embeddings = encoder(_fresh(inputs))
            if not isinstance(embeddings, torch.Tensor):
                raise TypeError(f"encoder: expected it to return a tensor, got {type(embeddings).__name__}")
            if grad_enabled:
                token = torch.empty(0, device=embeddings.device, requires_grad=True)
                embeddings = _Reencode.apply(token, embeddings, record)
                self._pending.add(record)
            outputs.append(embeddings)
        if not outputs:
            raise ValueError("inputs: no mini-batches to embed (an empty batch?)")
        return outputs

    def _mini_batches(self, inputs: Any) -> list[Any]:
        if isinstance(inputs, list | tuple):
            return list(inputs)
        if self.mini_batch_size is None:
            raise ValueError(
                "mini_batch_size: needed to split a batch; pass it to GradCache, or pass a list of mini-batches"
            )
        return split_batch(inputs, self.mini_batch_size)

    def _replay(self, mini_batch: _MiniBatch, grad: torch.Tensor) -> None:
        """Step 3 for one mini-batch: its forward again, with gradients, then its backward."""
        self._pending.discard(mini_batch)
        sync = self.no_sync is None or not self._pending
        with torch.enable_grad(), mini_batch.random_state.restored(), nullcontext() if sync else self.no_sync():
            with mini_batch.autocast_state.restored():
                embeddings = mini_batch.encoder(_fresh(mini_batch.inputs))
            if embeddings.shape != grad.shape:
                raise RuntimeError(
                    f"encoder: returned shape {tuple(embeddings.shape)} when re-encoding a mini-batch that gave "
                    f"{tuple(grad.shape)} the first time; GradCache needs the same forward twice"
                )
            if embeddings.requires_grad:  # a frozen encoder has nothing to backpropagate into
                torch.autograd.backward(embeddings, grad.to(embeddings.dtype))
