"""Low-precision copies of the LoRA factors for training under autocast, refreshed for every layer at once.

Under bf16 autocast each training forward needs A and B in bf16. Cast layer by layer that is two kernel launches
per layer and step (192 at IndexTTS2's GPT shape), and each launch costs more host time than the cast itself. The
factors only change when the optimizer steps, so each layer keeps its copies, keyed on the parameters' version
counters and storage; the first layer of a step to find its copies stale refreshes the stale copies of every
layer with one multi-tensor copy (torch._foreach_copy_), and the layers after it find theirs fresh.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor

_HOLDERS: "weakref.WeakSet" = weakref.WeakSet()  # layers holding copies (a layer that is gone drops out)
ATTR = "_train_casts"  # on a layer: (A, B, dtype, versions, Ac, Bc)


def _fresh(entry, A: Tensor, B: Tensor, dtype: torch.dtype) -> bool:
    return (entry is not None and entry[0] is A and entry[1] is B and entry[2] == dtype
            and entry[3] == (A._version, B._version, A.data_ptr(), B.data_ptr()))


def cast_factors(layer, A: Tensor, B: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(A, B) in `dtype`, as A.to(dtype), B.to(dtype) would give them, from the layer's kept copies."""
    entry = layer.__dict__.get(ATTR)
    if not _fresh(entry, A, B, dtype):
        entry = _refresh(layer, A, B, dtype)
    return entry[4], entry[5]


@torch.no_grad()
def _refresh(layer, A: Tensor, B: Tensor, dtype: torch.dtype):
    dst, src = [], []
    for other in list(_HOLDERS):  # every other stale copy of the same kind, in the same launch
        e = other.__dict__.get(ATTR)
        if other is not layer and e is not None and e[2] == dtype and e[4].device == A.device \
                and not _fresh(e, e[0], e[1], dtype):
            dst += [e[4], e[5]]
            src += [e[0], e[1]]
            other.__dict__[ATTR] = e[:3] + ((e[0]._version, e[1]._version, e[0].data_ptr(), e[1].data_ptr()),) + e[4:]
    entry = layer.__dict__.get(ATTR)
    if entry is not None and entry[4].shape == A.shape and entry[5].shape == B.shape and entry[2] == dtype \
            and entry[4].device == A.device:
        Ac, Bc = entry[4], entry[5]
        dst += [Ac, Bc]
        src += [A, B]
    else:
        Ac, Bc = A.detach().to(dtype, copy=True), B.detach().to(dtype, copy=True)
    if dst:
        torch._foreach_copy_(dst, [s.detach() for s in src])
    entry = (A, B, dtype, (A._version, B._version, A.data_ptr(), B.data_ptr()), Ac, Bc)
    layer.__dict__[ATTR] = entry
    _HOLDERS.add(layer)
    return entry
