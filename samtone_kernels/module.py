"""``SamToNeLoss``: the loss as an ``nn.Module``, optionally owning a learnable temperature."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ._backends import check_backend_here
from ._options import check_options, check_temperature
from .loss import fused_samtone_loss


class SamToNeLoss(nn.Module):
    """Module form of :func:`samtone_kernels.fused_samtone_loss`; see it for every option.

    Parameters
    ----------
    temperature : float, default 0.05
        The temperature, or its initial value when ``learnable_temperature=True``.
    learnable_temperature : bool, default False
        Own the temperature as a parameter, stored as its logarithm so it stays > 0.
    directions, partition, doc_anchor_weight, normalize, reduction, backend, gather_across_devices,
    process_group, hardness_mode, hardness_strength, chunk_bytes, false_negative_margin,
    hard_negative_scope, matryoshka_dims, matryoshka_weights
        As in ``fused_samtone_loss``; checked here, at construction.

    Examples
    --------
    >>> loss_fn = SamToNeLoss(temperature=0.05, directions=("q2d", "q2q", "d2q", "d2d"))
    >>> loss = loss_fn(query_embeddings, doc_embeddings)          # doctest: +SKIP
    """

    def __init__(
        self,
        temperature: float = 0.05,
        *,
        learnable_temperature: bool = False,
        directions: Sequence[str] = ("q2d", "q2q"),
        partition: str = "per_anchor",
        doc_anchor_weight: float = 1.0,
        normalize: bool = False,
        reduction: str = "mean",
        backend: str = "auto",
        gather_across_devices: bool = False,
        process_group: torch.distributed.ProcessGroup | None = None,
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
        chunk_bytes: int | None = None,
        false_negative_margin: float | None = None,
        hard_negative_scope: str = "shared",
        matryoshka_dims: Sequence[int] | None = None,
        matryoshka_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        options = check_options(
            directions=directions,
            partition=partition,
            doc_anchor_weight=doc_anchor_weight,
            normalize=normalize,
            reduction=reduction,
            hardness_mode=hardness_mode,
            hardness_strength=hardness_strength,
            gather_across_devices=gather_across_devices,
            chunk_bytes=chunk_bytes,
            false_negative_margin=false_negative_margin,
            hard_negative_scope=hard_negative_scope,
            matryoshka_dims=matryoshka_dims,
            matryoshka_weights=matryoshka_weights,
        )
        if isinstance(temperature, torch.Tensor):
            raise TypeError("temperature: pass a float; use learnable_temperature=True for a parameter")
        value = check_temperature(temperature)
        self.directions = options.directions
        self.partition = options.partition
        self.doc_anchor_weight = options.doc_anchor_weight
        self.normalize = options.normalize
        self.reduction = options.reduction
        self.backend = check_backend_here(backend)
        self.hardness_mode = options.hardness_mode
        self.hardness_strength = options.hardness_strength
        self.gather_across_devices = options.gather_across_devices
        self.process_group = process_group
        self.chunk_bytes = options.chunk_bytes
        self.false_negative_margin = options.false_negative_margin
        self.hard_negative_scope = options.hard_negative_scope
        self.matryoshka_dims = options.matryoshka_dims
        self.matryoshka_weights = options.matryoshka_weights
        if learnable_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(value)))
        else:
            self.log_temperature = None
            self._temperature = value

    @property
    def temperature(self) -> float | torch.Tensor:
        """The temperature: a float, or a 0-dim tensor with grad when learnable."""
        if self.log_temperature is None:
            return self._temperature
        return self.log_temperature.exp()

    def forward(
        self,
        queries: torch.Tensor,
        docs: torch.Tensor,
        hard_negatives: torch.Tensor | None = None,
        group_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of a batch: queries [N, D], docs [N, D], hard_negatives [N, H, D], group_ids [N]."""
        return fused_samtone_loss(
            queries,
            docs,
            hard_negatives,
            temperature=self.temperature,
            directions=self.directions,
            partition=self.partition,
            doc_anchor_weight=self.doc_anchor_weight,
            group_ids=group_ids,
            normalize=self.normalize,
            reduction=self.reduction,
            backend=self.backend,
            gather_across_devices=self.gather_across_devices,
            process_group=self.process_group,
            hardness_mode=self.hardness_mode,
            hardness_strength=self.hardness_strength,
            chunk_bytes=self.chunk_bytes,
            false_negative_margin=self.false_negative_margin,
            hard_negative_scope=self.hard_negative_scope,
            matryoshka_dims=self.matryoshka_dims,
            matryoshka_weights=self.matryoshka_weights,
        )

    def extra_repr(self) -> str:
        tau = "learnable" if self.log_temperature is not None else f"{self._temperature:g}"
        return (
            f"temperature={tau}, directions={self.directions}, partition={self.partition!r}, "
            f"doc_anchor_weight={self.doc_anchor_weight:g}, normalize={self.normalize}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}, "
            f"gather_across_devices={self.gather_across_devices}"
            + (
                f", hardness_mode={self.hardness_mode!r}, hardness_strength={self.hardness_strength:g}"
                if self.hardness_mode
                else ""
            )
        )
