"""Low-precision copies for training under autocast: the LoRA factors, refreshed for every layer at once, and the
frozen base weight kept cast with A's rows appended.

Under bf16 autocast each training forward needs A and B in bf16. Cast layer by layer that is two kernel launches
per layer and step (192 at IndexTTS2's GPT shape), and each launch costs more host time than the cast itself. The
factors only change when the optimizer steps, so each layer keeps its copies, keyed on the parameters' version
counters, storage and the optimizer step count (optimizer_steps.py: fused optimizers bump no versions); the first
layer of a step to find its copies stale refreshes the stale copies of every layer with one multi-tensor copy
(torch._foreach_copy_), and the layers after it find theirs fresh.

The base weight (frozen, fp32 masters under bf16 autocast) would be cast in every forward and again in every backward:
two launches and ~6 bytes of traffic per weight element each, per layer and step. A layer instead keeps it cast once,
as `base` = [W as [out, in]; A_c] ([out + R, in]): A's copy is its last R rows, so the forward's base GEMM gives
x [W; A]^T = [base(x) | x A^T] in one cuBLAS call, and the backward's dx = dy W reads base[:out]. The price is the
cast weight kept between steps (2 bytes per element of a targeted bf16-autocast fp32 weight; the frozen floor holds the
same cast copies from its forward until its backward). `LoRALayer.keep_cast_base = False` turns it off.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import optimizer_steps

_HOLDERS: "weakref.WeakSet" = weakref.WeakSet()  # layers holding copies (a layer that is gone drops out)
ATTR = "_train_casts"  # on a layer: its Copies


class Copies(NamedTuple):
    A: Tensor  # the parameters copied (held: their ids stay unique)
    B: Tensor
    dtype: torch.dtype
    stamp: tuple  # `_stamp(A, B)` when copied
    Ac: Tensor  # A.to(dtype): base[out:] when the base is kept
    Bc: Tensor
    base: Tensor | None = None  # [W as [out, in]; Ac] in dtype
    bias: Tensor | None = None  # [bias; zeros(R)] in dtype (None: the base has no bias)
    base_stamp: tuple = ()  # `_base_stamp(weight, bias)` when cast
    kept: tuple | None = None  # with a base: functional._KeptLoRAFn's views of it, (K^T, bias, W, Ac, Bc, Bc^T)

    def tensors(self) -> tuple:
        """(Ac, Bc, base, bias): what the training Function takes (tensors alone: dynamo would guard on the stamps)."""
        return self.Ac, self.Bc, self.base, self.bias


def _stamp(A: Tensor, B: Tensor) -> tuple:
    """Versions catch in-place updates; data_ptr catches replaced storage (`p.data = ...`); the optimizer step count
    catches fused optimizers, which update in place without bumping versions (optimizer_steps.py)."""
    return A._version, B._version, A.data_ptr(), B.data_ptr(), optimizer_steps.steps()


def _base_stamp(weight: Tensor, bias: Tensor | None) -> tuple:
    """The frozen base changes only when someone writes it (load_state_dict, merge): versions and storage."""
    return (weight._version, weight.data_ptr()) + (() if bias is None else (bias._version, bias.data_ptr()))


def _fresh(c: Copies | None, A: Tensor, B: Tensor, dtype: torch.dtype) -> bool:
    return c is not None and c.A is A and c.B is B and c.dtype == dtype and c.stamp == _stamp(A, B)


def _base_fresh(c: Copies, weight: Tensor | None, bias: Tensor | None) -> bool:
    if weight is None:
        return c.base is None
    return c.base is not None and c.base_stamp == _base_stamp(weight, bias) and (c.bias is None) == (bias is None)


def keeps_base(weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> bool:
    """Whether a training forward in `dtype` may keep this base cast: frozen, and only when it needs a cast at all."""
    return weight.dtype != dtype and not weight.requires_grad and (bias is None or not bias.requires_grad)


def cast_factors(layer, A: Tensor, B: Tensor, dtype: torch.dtype, weight: Tensor | None = None,
                 bias: Tensor | None = None, layout: str = "out_in") -> Copies:
    """The layer's Copies: Ac, Bc as A.to(dtype), B.to(dtype) would give them, and with `weight` (frozen, of the
    given layout) also `base` = [W as [out, in]; Ac] and `bias` = [bias; 0] in `dtype`."""
    c = layer.__dict__.get(ATTR)
    if not _fresh(c, A, B, dtype) or not _base_fresh(c, weight, bias):
        c = _refresh(layer, A, B, dtype, weight, bias, layout)
    return c


@torch.no_grad()
def _refresh(layer, A: Tensor, B: Tensor, dtype: torch.dtype, weight: Tensor | None, bias: Tensor | None,
             layout: str) -> Copies:
    dst, src = [], []
    _take_stale(dst, src, skip=layer, dtype=dtype, device=A.device)  # every other stale copy, in the same launch
    c = layer.__dict__.get(ATTR)
    reuse = c is not None and c.Ac.shape == A.shape and c.Bc.shape == B.shape and c.dtype == dtype \
        and c.Ac.device == A.device and _base_fresh(c, weight, bias)
    base, bias_c = (c.base, c.bias) if reuse else _cast_base(weight, bias, layout, A.shape[0], dtype)
    if reuse:
        Ac, Bc = c.Ac, c.Bc
    else:
        Ac = A.detach().to(dtype, copy=True) if base is None else base[base.shape[0] - A.shape[0]:]
        Bc = B.detach().to(dtype, copy=True)
    dst += [Ac, Bc]
    src += [A.detach(), B.detach()]
    torch._foreach_copy_(dst, src)
    stamp = () if weight is None else _base_stamp(weight, bias)
    kept = c.kept if reuse else _kept_views(base, bias_c, Ac, Bc)
    c = layer.__dict__[ATTR] = Copies(A, B, dtype, _stamp(A, B), Ac, Bc, base, bias_c, stamp, kept)
    _HOLDERS.add(layer)
    return c


def _take_stale(dst: list, src: list, skip=None, dtype: torch.dtype | None = None,
                device: torch.device | None = None, drop_written_bases: bool = False) -> None:
    """Add every holder's stale copies (of `dtype` on `device` when given; not `skip`'s) to one multi-tensor copy's
    destinations and sources, and mark them fresh; `drop_written_bases`: first forget the copies of a holder whose
    base was written since it was cast. Called under no_grad (no detach needed) after every optimizer step, over
    every layer in one pass (~2.8 us a layer on a 2-core CPU, from 4.6)."""
    for other in list(_HOLDERS):
        c = other.__dict__.get(ATTR)
        if other is skip or c is None:
            continue
        if drop_written_bases and c.base is not None and not _base_fresh(c, *other.base_params()):
            del other.__dict__[ATTR]  # made again at the next training forward (a compiled graph: retraced)
            _HOLDERS.discard(other)
            continue
        A, B = c.A, c.B
        stamp = _stamp(A, B)
        if stamp == c.stamp or dtype not in (None, c.dtype) or device not in (None, c.Ac.device):
            continue
        dst += (c.Ac, c.Bc)
        src += (A, B)
        other.__dict__[ATTR] = c._replace(stamp=stamp)


def _cast_base(weight: Tensor | None, bias: Tensor | None, layout: str, rank: int, dtype: torch.dtype
               ) -> tuple[Tensor | None, Tensor | None]:
    """[W as [out, in]; R rows for Ac] and [bias; 0] in `dtype` (the Ac rows are written by the caller)."""
    if weight is None:
        return None, None
    w = weight.detach() if layout == "out_in" else weight.detach().t()
    base = torch.empty(w.shape[0] + rank, w.shape[1], dtype=dtype, device=w.device)
    base[:w.shape[0]].copy_(w)
    bias_c = None if bias is None else torch.cat([bias.detach().to(dtype), bias.new_zeros(rank, dtype=dtype)])
    return base, bias_c


def _kept_views(base: Tensor | None, bias: Tensor | None, Ac: Tensor, Bc: Tensor) -> tuple | None:
    """The views functional._KeptLoRAFn takes, made once per cast base (each view is a torch call in the step)."""
    if base is None:
        return None
    return base.t(), bias, base[:base.shape[0] - Ac.shape[0]], Ac, Bc, Bc.t()


def made(layer, A: Tensor, B: Tensor, dtype: torch.dtype) -> tuple | None:
    """The layer's Copies for these parameters in `dtype` as they are, without any check of their freshness: what a
    torch.compile'd graph reads (dynamo cannot trace the checks). They were made before tracing (`prepare`) and are
    refreshed after every optimizer step (`_after_step`); None: trace without them."""
    c = layer.__dict__.get(ATTR)
    return c.tensors() if c is not None and c.A is A and c.B is B and c.dtype == dtype and c.base is not None else None


def prepare(model, dtype: torch.dtype) -> int:
    """Make the copies (and kept cast bases) of every LoRA layer training one adapter in `dtype` now, before
    torch.compile traces the model, so that the graph reads them. Returns how many layers have them."""
    from .layers import training_casts  # layers.py imports this module
    from .inject import lora_layers
    n = 0
    for layer in lora_layers(model).values():
        if len(layer.blend) == 1:
            A, B = layer.factor_pair(next(iter(layer.blend)))
            n += training_casts(layer, A, B, dtype, *layer.base_params()) is not None
    return n


def release(model) -> None:
    """Forget every LoRA layer's copies (after training: the kept cast bases only take memory for inference)."""
    from .inject import lora_layers
    for layer in lora_layers(model).values():
        if layer.__dict__.pop(ATTR, None) is not None:
            _HOLDERS.discard(layer)


@torch.no_grad()
def _after_step(optimizer, args, kwargs) -> None:
    """After every optimizer step: the stale copies of every layer, refreshed with one multi-tensor copy (what the
    first training forward of the next step would do; a compiled graph cannot), and a base written since it was
    cast (load_state_dict between steps) forgotten."""
    dst, src = [], []
    _take_stale(dst, src, drop_written_bases=True)
    if dst:
        torch._foreach_copy_(dst, src)


_HOOK = register_optimizer_step_post_hook(_after_step)  # after optimizer_steps' (imported above: registered first)
