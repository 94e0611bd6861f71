"""The LoRA math, as functions: a plain reference path and the fast path the layers use.

Shapes (PEFT orientation for every base kind):
    x [..., in], A [R, in], B [out, R], d [R] or [batch, R]
    y = base(x) + ((x @ A^T) * d) @ B^T

With several adapters blended, A/B are the adapters stacked along the rank (A_cat, B_cat) and d holds
w_i * s_i repeated r_i times, so the blend is one pair of GEMMs and exactly sum_i w_i s_i B_i A_i x
(the block structure leaves no cross terms). A 2-D d is a different mix for every row of the batch.

`layout` says how the base weight is stored: "out_in" (nn.Linear, y = x W^T + b) or "in_out"
(transformers Conv1D, y = x W + b).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def base_linear(x: Tensor, weight: Tensor, bias: Tensor | None, layout: str) -> Tensor:
    """The base layer alone, computed exactly as nn.Linear / transformers Conv1D compute it."""
    if layout == "out_in":
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.addmm(bias, x2, weight) if bias is not None else x2 @ weight
    return y.view(*x.shape[:-1], weight.shape[1])


def scale_rows(h: Tensor, d: Tensor, batch: int) -> Tensor:
    """h [N, R] * d, where d is [R] (one mix) or [batch, R] (a mix per row; N = batch * tokens)."""
    if d.dim() == 1:
        return h * d
    return (h.view(batch, -1, h.shape[-1]) * d.unsqueeze(1)).view(h.shape)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the GEMMs run in: autocast's when it is on (no fp32 copy of x), else x's own."""
    dev = x.device.type
    if x.dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def check_rows(x: Tensor, d: Tensor) -> None:
    if d.dim() == 2 and (x.dim() < 2 or x.shape[0] != d.shape[0]):
        raise ValueError(f"per-row blend weights have length {d.shape[0]} but the input batch is "
                         f"{tuple(x.shape)}: give one weight per row of dim 0, or use float weights")


def _fused_forward(x, weight, bias, A, B, d, layout):
    """y = base(x) accumulated with the LoRA term into the same output buffer (no extra pass)."""
    ct = compute_dtype(x)
    x2 = x.reshape(-1, x.shape[-1]).to(ct)
    w = weight.to(ct)
    wt = w.t() if layout == "out_in" else w
    y = torch.addmm(bias.to(ct), x2, wt) if bias is not None else x2 @ wt
    h = scale_rows(x2 @ A.to(ct).t(), d.to(ct), x.shape[0])
    y.addmm_(h, B.to(ct).t())
    return y.view(*x.shape[:-1], y.shape[-1]), x2, w


class _LoRALinearFn(torch.autograd.Function):
    """Frozen-base LoRA with a hand-written backward: saves only x (cast once), recomputes x A^T."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, d, layout):
        y, x2, w = _fused_forward(x, weight, bias, A, B, d, layout)
        ctx.save_for_backward(x2, w, A, B, d)
        ctx.layout, ctx.x_shape, ctx.x_dtype = layout, x.shape, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, w, A, B, d = ctx.saved_tensors
        ct, batch = x2.dtype, ctx.x_shape[0]
        dy2 = dy.reshape(-1, dy.shape[-1]).to(ct)
        Ac, Bc, dc = A.to(ct), B.to(ct), d.to(ct)
        g = scale_rows(dy2 @ Bc, dc, batch)  # dL/d(x A^T)  [N, R]
        dx = dA = dB = None
        if ctx.needs_input_grad[0]:
            dx = dy2 @ (w if ctx.layout == "out_in" else w.t())
            dx.addmm_(g, Ac)
            dx = dx.view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            dA = (g.t() @ x2).to(A.dtype)
        if ctx.needs_input_grad[4]:
            h = scale_rows(x2 @ Ac.t(), dc, batch)  # recomputed here instead of stored in forward
            dB = (dy2.t() @ h).to(B.dtype)
        return dx, None, None, dA, dB, None, None


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, d: Tensor,
                layout: str) -> Tensor:
    """Fast path for a frozen base: y = base(x) + ((x A^T) * d) B^T in one output buffer."""
    check_rows(x, d)
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad):
        return _LoRALinearFn.apply(x, weight, bias, A, B, d, layout)
    return _fused_forward(x, weight, bias, A, B, d, layout)[0]


def lora_linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None, layout: str,
                          As: Sequence[Tensor], Bs: Sequence[Tensor], scales: Sequence[Tensor],
                          dropouts: Sequence[float], training: bool) -> Tensor:
    """Plain autograd, one adapter at a time: y = base(x) + sum_i s_i * (drop_i(x) A_i^T) B_i^T.

    `scales[i]` is a 0-d tensor or one value per batch row. Used for dropout > 0, a trainable base,
    and as the reference the fast path is tested against.
    """
    y = base_linear(x, weight, bias, layout)
    for A, B, s, p in zip(As, Bs, scales, dropouts):
        xd = F.dropout(x, p, training) if p > 0 else x
        h = xd.to(y.dtype) @ A.to(y.dtype).t()
        s = s.to(y.dtype).view(-1, *([1] * (h.dim() - 1))) if s.dim() == 1 else s.to(y.dtype)
        y = y + (h * s) @ B.to(y.dtype).t()
    return y


def lora_embedding(idx: Tensor, weight: Tensor, A: Tensor, B: Tensor, d: Tensor, **embedding_kw) -> Tensor:
    """y = W[idx] + ((A^T)[idx] * d) B^T; A [R, num_embeddings], B [dim, R]."""
    check_rows(idx, d)
    y = F.embedding(idx, weight, **embedding_kw)
    h = F.embedding(idx, A.t()).reshape(-1, A.shape[0]).to(y.dtype)
    h = scale_rows(h, d.to(y.dtype), idx.shape[0])
    return y + (h @ B.to(y.dtype).t()).view(y.shape)


def delta_weight(A: Tensor, B: Tensor, d: Tensor, layout: str) -> Tensor:
    """The merged update in the base weight's own layout, in fp32: (B diag(d) A), transposed for "in_out"."""
    Bd = B.float() * d.float()
    return Bd @ A.float() if layout == "out_in" else A.float().t() @ Bd.t()
