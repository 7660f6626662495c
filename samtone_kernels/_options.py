"""Validation of the loss options and inputs: every bad argument raises here, before any compute."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence

import torch

from ._constants import ALL_DIRECTIONS, FLOAT_DTYPES, HARD_NEGATIVE_SCOPES, HARDNESS_MODES, PARTITIONS, REDUCTIONS
from ._contract import LossOptions


def check_options(
    *,
    directions,
    partition,
    doc_anchor_weight,
    normalize,
    reduction,
    hardness_mode=None,
    hardness_strength=0.0,
    gather_across_devices=False,
    chunk_bytes=None,
    false_negative_margin=None,
    hard_negative_scope="shared",
    matryoshka_dims=None,
    matryoshka_weights=None,
) -> LossOptions:
    """Validate the non-tensor options; raise ``TypeError``/``ValueError`` naming the argument. A
    ``doc_anchor_weight`` other than 1 without "d2q", which weighs nothing, warns."""
    if isinstance(directions, str) or not isinstance(directions, Sequence | set | frozenset):
        if isinstance(directions, str) and directions in ALL_DIRECTIONS[1:]:
            hint = f"write ('q2d', {directions!r}): 'q2d' holds the positive pair and is always needed"
        else:
            hint = "write ('q2d',) for InfoNCE alone"
        raise TypeError(f"directions: expected a sequence of names from {ALL_DIRECTIONS}, got {directions!r} ({hint})")
    for name in directions:
        if name not in ALL_DIRECTIONS:
            raise ValueError(f"directions: unknown direction {name!r}, expected names from {ALL_DIRECTIONS}")
    if len(set(directions)) != len(tuple(directions)):
        raise ValueError(f"directions: each direction at most once, got {tuple(directions)!r}")
    if "q2d" not in directions:
        raise ValueError("directions: 'q2d' is required (it holds the positive pair)")
    canonical = tuple(name for name in ALL_DIRECTIONS if name in directions)

    if partition not in PARTITIONS:
        raise ValueError(f"partition: expected one of {PARTITIONS}, got {partition!r}")
    if "d2d" in directions and "d2q" not in directions and partition != "joint":
        raise ValueError(
            "directions: 'd2d' without 'd2q' needs partition='joint' (a document's own softmax holds its "
            "positive only through 'd2q')"
        )
    if isinstance(doc_anchor_weight, bool) or not isinstance(doc_anchor_weight, numbers.Real):
        raise TypeError(f"doc_anchor_weight: expected a real number, got {type(doc_anchor_weight).__name__}")
    weight = float(doc_anchor_weight)
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"doc_anchor_weight: expected a finite value >= 0, got {weight}")
    if partition == "joint" and weight != 1.0:
        raise ValueError("doc_anchor_weight: must be 1.0 with partition='joint' (one softmax has no per-anchor weight)")
    if weight != 1.0 and "d2q" not in directions:
        warnings.warn(
            f"doc_anchor_weight={weight} has no effect without 'd2q' in directions (it weighs the "
            "document-anchored loss, as in DANCE)",
            UserWarning,
            stacklevel=3,
        )
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize: expected a bool, got {type(normalize).__name__}")
    if not isinstance(gather_across_devices, bool):
        raise TypeError(f"gather_across_devices: expected a bool, got {type(gather_across_devices).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if hardness_mode not in HARDNESS_MODES:
        raise ValueError(f"hardness_mode: expected one of {HARDNESS_MODES}, got {hardness_mode!r}")
    if isinstance(hardness_strength, bool) or not isinstance(hardness_strength, numbers.Real):
        raise TypeError(f"hardness_strength: expected a real number, got {type(hardness_strength).__name__}")
    strength = float(hardness_strength)
    if not math.isfinite(strength) or strength < 0:
        raise ValueError(f"hardness_strength: expected a finite value >= 0, got {strength}")
    if strength > 0 and hardness_mode is None:
        warnings.warn(
            f"hardness_strength={strength} has no effect without hardness_mode (set hardness_mode to "
            "'in_batch_negatives', 'hard_negatives' or 'all_negatives')",
            UserWarning,
            stacklevel=3,
        )
    if strength == 0 and hardness_mode is not None:
        warnings.warn(
            f"hardness_mode={hardness_mode!r} has no effect with hardness_strength=0.0 (set a positive strength)",
            UserWarning,
            stacklevel=3,
        )
    if hard_negative_scope not in HARD_NEGATIVE_SCOPES:
        raise ValueError(f"hard_negative_scope: expected one of {HARD_NEGATIVE_SCOPES}, got {hard_negative_scope!r}")
    return LossOptions(
        canonical,
        partition,
        weight,
        normalize,
        reduction,
        hardness_mode,
        strength,
        gather_across_devices,
        check_chunk_bytes(chunk_bytes),
        check_margin(false_negative_margin),
        hard_negative_scope,
        *check_matryoshka(matryoshka_dims, matryoshka_weights),
    )


def check_matryoshka(dims, weights) -> tuple[tuple[int, ...] | None, tuple[float, ...] | None]:
    """The Matryoshka prefixes: dims a sequence of ints >= 1, strictly increasing (that the last is D
    is checked with the tensors, ``check_matryoshka_dim``), weights None (all 1) or one finite value
    >= 0 per dim; both None: off."""
    if dims is None:
        if weights is not None:
            raise ValueError("matryoshka_weights: given without matryoshka_dims")
        return None, None
    if isinstance(dims, str | bytes) or not isinstance(dims, Sequence):
        raise TypeError(f"matryoshka_dims: expected a sequence of ints, got {type(dims).__name__}")
    if not dims or any(isinstance(m, bool) or not isinstance(m, numbers.Integral) for m in dims):
        raise TypeError(f"matryoshka_dims: expected a non-empty sequence of ints, got {dims!r}")
    dims = tuple(int(m) for m in dims)
    if dims[0] < 1 or any(b <= a for a, b in zip(dims, dims[1:])):
        raise ValueError(f"matryoshka_dims: expected strictly increasing dims >= 1, got {dims}")
    if weights is None:
        return dims, (1.0,) * len(dims)
    if isinstance(weights, str | bytes) or not isinstance(weights, Sequence):
        raise TypeError(f"matryoshka_weights: expected a sequence of numbers, got {type(weights).__name__}")
    if any(isinstance(w, bool) or not isinstance(w, numbers.Real) for w in weights):
        raise TypeError(f"matryoshka_weights: expected real numbers, got {weights!r}")
    weights = tuple(float(w) for w in weights)
    if len(weights) != len(dims):
        raise ValueError(f"matryoshka_weights: expected one weight per dim ({len(dims)}), got {len(weights)}")
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"matryoshka_weights: expected finite values >= 0, got {weights}")
    return dims, weights


def check_matryoshka_dim(options: LossOptions, dim: int) -> None:
    """The largest Matryoshka prefix must be the whole embedding."""
    if options.matryoshka_dims is not None and options.matryoshka_dims[-1] != dim:
        raise ValueError(
            f"matryoshka_dims: the last dim must be the embeddings' D = {dim}, got {options.matryoshka_dims}"
        )


def check_margin(margin) -> float | None:
    """The false-negative margin: a finite real number (of raw similarity), or None (off)."""
    if margin is None:
        return None
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real):
        raise TypeError(f"false_negative_margin: expected a real number or None, got {type(margin).__name__}")
    if not math.isfinite(float(margin)):
        raise ValueError(f"false_negative_margin: expected a finite value (None turns it off), got {margin}")
    return float(margin)


def check_chunk_bytes(chunk_bytes) -> int | None:
    """A memory budget in bytes: an int >= 1, or None (the backend's default)."""
    if chunk_bytes is None:
        return None
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, numbers.Integral) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes: expected an int >= 1 (bytes) or None, got {chunk_bytes!r}")
    return int(chunk_bytes)


def check_temperature(temperature) -> float | torch.Tensor:
    """A Python number > 0 and finite, or a 0-dim floating tensor.

    A tensor's value is checked here when it lives on the CPU; reading a GPU tensor would force a
    host-device sync every step, so there the loss is NaN instead for a value that is not > 0 and
    finite (see ``loss._temperature_scale``).
    """
    if isinstance(temperature, torch.Tensor):
        if temperature.dim() != 0:
            raise ValueError(f"temperature: expected a 0-dim tensor (or a float), got shape {tuple(temperature.shape)}")
        if not temperature.is_floating_point():
            raise TypeError(f"temperature: expected a floating tensor, got {temperature.dtype}")
        if temperature.device.type == "cpu" and not torch.compiler.is_compiling():
            value = float(temperature.detach())
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"temperature: expected a finite value > 0, got {value}")
        return temperature
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature: expected a float or a 0-dim tensor, got {type(temperature).__name__}")
    value = float(temperature)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature: expected a finite value > 0, got {value}")
    return value


def _check_embedding(name: str, x, ndim: int, shape_doc: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating tensor (float16, bfloat16, float32 or float64), got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name}: expected shape {shape_doc}, got {tuple(x.shape)}")


def check_inputs(queries, docs, hard_negatives, group_ids) -> torch.Tensor | None:
    """Check shapes, dtypes and devices of the tensors; return group ids on the embeddings' device."""
    _check_embedding("queries", queries, 2, "[N, D]")
    _check_embedding("docs", docs, 2, "[N, D]")
    n_pairs, dim = queries.shape
    if n_pairs == 0:
        raise ValueError("queries: empty batch (N = 0); the loss needs at least one pair")
    if dim == 0:
        raise ValueError("queries: embedding dimension D = 0; expected D >= 1")
    if docs.shape != queries.shape:
        raise ValueError(
            f"docs: expected shape [N, D] = {tuple(queries.shape)} to match queries, got {tuple(docs.shape)}"
        )
    tensors = {"queries": queries, "docs": docs}
    if hard_negatives is not None:
        _check_embedding("hard_negatives", hard_negatives, 3, "[N, H, D]")
        if hard_negatives.shape[0] != n_pairs or hard_negatives.shape[2] != dim:
            raise ValueError(
                f"hard_negatives: expected shape [N, H, D] with N = {n_pairs}, D = {dim}, "
                f"got {tuple(hard_negatives.shape)}"
            )
        tensors["hard_negatives"] = hard_negatives
    for name, x in tensors.items():
        if x.dtype != queries.dtype:
            raise TypeError(f"{name}: dtype {x.dtype} differs from queries' {queries.dtype}; use one dtype")
        if x.device != queries.device:
            raise ValueError(f"{name}: on {x.device}, but queries are on {queries.device}; use one device")

    if group_ids is None:
        return None
    if not isinstance(group_ids, torch.Tensor):
        raise TypeError(f"group_ids: expected an integer tensor of shape [N], got {type(group_ids).__name__}")
    if group_ids.dtype == torch.bool or group_ids.is_floating_point() or group_ids.is_complex():
        raise TypeError(f"group_ids: expected an integer tensor, got {group_ids.dtype}")
    if tuple(group_ids.shape) != (n_pairs,):
        raise ValueError(f"group_ids: expected shape [N] = ({n_pairs},), got {tuple(group_ids.shape)}")
    return group_ids.to(device=queries.device, dtype=torch.int64, non_blocking=True)
