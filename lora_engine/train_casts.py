"""Low-precision copies of the LoRA factors for training under autocast, refreshed for every layer at once.

Under bf16 autocast each training forward needs A and B in bf16. Cast layer by layer that is two kernel launches
per layer and step (192 at IndexTTS2's GPT shape), and each launch costs more host time than the cast itself. The
factors only change when the optimizer steps, so each layer keeps its copies, keyed on the parameters' version
counters, storage and the optimizer step count (optimizer_steps.py: fused optimizers bump no versions); the first
layer of a step to find its copies stale refreshes the stale copies of every layer with one multi-tensor copy
(torch._foreach_copy_), and the layers after it find theirs fresh.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
from torch import Tensor

from . import optimizer_steps

_HOLDERS: "weakref.WeakSet" = weakref.WeakSet()  # layers holding copies (a layer that is gone drops out)
ATTR = "_train_casts"  # on a layer: its Copies


class Copies(NamedTuple):
    A: Tensor  # the parameters copied (held: their ids stay unique)
    B: Tensor
    dtype: torch.dtype
    stamp: tuple  # `_stamp(A, B)` when copied
    Ac: Tensor
    Bc: Tensor


def _stamp(A: Tensor, B: Tensor) -> tuple:
    """Versions catch in-place updates; data_ptr catches replaced storage (`p.data = ...`); the optimizer step count
    catches fused optimizers, which update in place without bumping versions (optimizer_steps.py)."""
    return A._version, B._version, A.data_ptr(), B.data_ptr(), optimizer_steps.steps()


def _fresh(c: Copies | None, A: Tensor, B: Tensor, dtype: torch.dtype) -> bool:
    return c is not None and c.A is A and c.B is B and c.dtype == dtype and c.stamp == _stamp(A, B)


def cast_factors(layer, A: Tensor, B: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(A, B) in `dtype`, as A.to(dtype), B.to(dtype) would give them, from the layer's kept copies."""
    c = layer.__dict__.get(ATTR)
    if not _fresh(c, A, B, dtype):
        c = _refresh(layer, A, B, dtype)
    return c.Ac, c.Bc


@torch.no_grad()
def _refresh(layer, A: Tensor, B: Tensor, dtype: torch.dtype) -> Copies:
    dst, src = [], []
    for other in list(_HOLDERS):  # every other stale copy of the same kind, in the same launch
        c = other.__dict__.get(ATTR)
        if other is not layer and c.dtype == dtype and c.Ac.device == A.device and not _fresh(c, c.A, c.B, dtype):
            dst += [c.Ac, c.Bc]
            src += [c.A, c.B]
            other.__dict__[ATTR] = c._replace(stamp=_stamp(c.A, c.B))
    c = layer.__dict__.get(ATTR)
    if c is not None and c.Ac.shape == A.shape and c.Bc.shape == B.shape and c.dtype == dtype \
            and c.Ac.device == A.device:
        Ac, Bc = c.Ac, c.Bc
        dst += [Ac, Bc]
        src += [A, B]
    else:
        Ac, Bc = A.detach().to(dtype, copy=True), B.detach().to(dtype, copy=True)
    if dst:
        torch._foreach_copy_(dst, [s.detach() for s in src])
    c = layer.__dict__[ATTR] = Copies(A, B, dtype, _stamp(A, B), Ac, Bc)
    _HOLDERS.add(layer)
    return c
