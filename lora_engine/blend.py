"""Runtime voice blending: which adapters are active, with what weights, without touching base weights."""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor, nn

from .inject import adapter_names, lora_layers
from .layers import BlendWeight


def check_weights(model: nn.Module, weights: Mapping[str, BlendWeight], allow_rows: bool = True,
                  layers: Mapping[str, nn.Module] | None = None) -> None:
    """Refuse unknown adapters, non-finite weights and per-row tensors of the wrong shape.

    `layers`: the model's lora_layers() when the caller already has them (saves walking the model again)."""
    if layers is None:
        known = adapter_names(model)
    else:
        known = list({n: None for layer in layers.values() for n in layer.lora_A.keys()})
    unknown = [n for n in weights if n not in known]
    if unknown:
        raise KeyError(f"unknown adapter(s) {unknown}; the model has {known}")
    rows = set()
    for name, w in weights.items():
        if isinstance(w, Tensor):
            if not allow_rows:
                raise ValueError(f"weight of {name!r} is a tensor: per-row weights only blend at runtime "
                                 "(set_blend); merge takes one float per adapter")
            if w.dim() != 1 or w.numel() == 0:
                raise ValueError(f"per-row weight of {name!r} must be a 1-D tensor of length batch, "
                                 f"got shape {tuple(w.shape)}")
            if not torch.isfinite(w).all():
                raise ValueError(f"per-row weight of {name!r} has NaN/inf values")
            rows.add(w.shape[0])
        elif not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
            raise ValueError(f"weight of {name!r} must be a finite float or a 1-D tensor, got {w!r}")
    if len(rows) > 1:
        raise ValueError(f"per-row weights have different lengths {sorted(rows)}: give one per batch row")


def set_blend(model: nn.Module, weights: Mapping[str, BlendWeight]) -> None:
    """Make `weights` the active mix: y = base(x) + sum_i w_i * s_i * B_i A_i x, unmerged.

    A weight is a float, or a 1-D tensor with one weight per batch row (a different mix per row).
    `set_blend(model, {})` runs the base alone. Computed as one GEMM pair over the stacked ranks.
    """
    weights = dict(weights)
    check_weights(model, weights)
    layers = lora_layers(model).values()
    if any(layer.merged is not None for layer in layers):
        raise RuntimeError("the model is merged: call unmerge(model) before changing the runtime blend")
    for layer in layers:
        layer.set_blend(weights)


def get_blend(model: nn.Module) -> dict[str, BlendWeight]:
    """The active mix, as set by inject_lora / load_adapter / set_blend."""
    out: dict[str, BlendWeight] = {}
    for layer in lora_layers(model).values():
        out.update(layer.blend)
    return out
