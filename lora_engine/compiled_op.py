"""The training LoRA linear in the form torch.compile should see: skinny products as Inductor reductions.

On the H200 host every cuBLAS call costs ~40 us of CPU (dispatch, heuristics, launch), and a compiled step is as
much host-bound as an eager one: traced as GEMMs, LoRA's six small products per layer made the compiled step 1.9x
the compiled frozen floor, and as opaque ops calling the eager code it was 3.1x (benchmarks/NOTES.md (13)).
Here the products with a rank-sized dimension are written as broadcast-multiply-sum, which Inductor turns into
fused Triton kernels (launched for a few microseconds of host time, and fused with the casts and pointwise ops
around them):
    forward   h = x A^T                  a reduction over `in` per row (R outputs)
              y = base(x) + (h d) B^T    R FMAs per output element, fused into y's consumer
    backward  u = dy B                   a reduction over `out` per row
              dx = dy W + (u d) A        the base's own GEMM + R FMAs per element
              dA = (u d)^T x, dB = dy^T (h d)   GEMMs (long reductions over the batch: cuBLAS does them well)
so a LoRA layer adds two cuBLAS calls to the two of its frozen base. Used only while dynamo traces (eager runs
functional._LoRALinearFn: there each of these expressions would materialise a [N, R, in] product).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .functional import _base_in, _LoRALinearFn, compute_dtype, scale_rows


MAX_UNROLLED_RANK = 16  # above this the up-projections go back to a GEMM (the unrolled sum would grow the kernels)


def _add_rank_terms(base: Tensor, P: Tensor, Q: Tensor) -> Tensor:
    """base + P Q^T for P [N, R], Q [M, R] of small R, as R rank-1 terms: a pointwise expression Inductor fuses
    into base's producer or consumer (fp32 arithmetic, rounded once by the caller)."""
    if P.shape[1] > MAX_UNROLLED_RANK:
        return torch.addmm(base, P.float(), Q.float().t())
    out = base.float()
    for r in range(P.shape[1]):
        out = out + P[:, r:r + 1].float() * Q[:, r].float()
    return out


class _LoRALinearTracedFn(torch.autograd.Function):
    """y = base(x) + ((x A^T) * d) B^T with a hand-written backward, for torch.compile to trace (see above)."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, d, s, layout):
        ct = compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1]).to(ct)
        Ac, Bc = A.to(ct), B.to(ct)
        h = x2 @ Ac.t()
        hd = h * s if s is not None else scale_rows(h, d.to(ct), x.shape[0])
        y = _add_rank_terms(_base_in(x2, weight, bias, ct, layout), hd, Bc).to(ct)
        ctx.save_for_backward(x2, weight, Ac, Bc, hd, d)
        ctx.s, ctx.layout, ctx.x_shape, ctx.x_dtype = s, layout, x.shape, x.dtype
        ctx.grad_dtypes = (A.dtype, B.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, Ac, Bc, hd, d = ctx.saved_tensors
        ct, s = x2.dtype, ctx.s
        dy2 = dy.reshape(-1, dy.shape[-1]).to(ct)
        u = dy2 @ Bc  # [N, R]
        ud = u * s if s is not None else scale_rows(u, d.to(ct), ctx.x_shape[0])
        dx = dA = dB = None
        if ctx.needs_input_grad[0]:
            w = weight.to(ct)
            base = dy2 @ (w if ctx.layout == "out_in" else w.t())
            dx = _add_rank_terms(base, ud, Ac.t()).view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            dA = (ud.t() @ x2).to(ctx.grad_dtypes[0])
        if ctx.needs_input_grad[4]:
            dB = (dy2.t() @ hd).to(ctx.grad_dtypes[1])
        return dx, None, None, dA, dB, None, None, None


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, d: Tensor, layout: str,
                s: float | None = None, form: str = "rank1") -> Tensor:
    """functional.lora_linear's training form while dynamo traces. form="gemm" traces the eager autograd Function
    as it is instead (every product a cuBLAS call): kept so the benchmarks can compare the two in one process."""
    if form == "gemm":
        return _LoRALinearFn.apply(x, weight, bias, A, B, d, s, layout, None)
    return _LoRALinearTracedFn.apply(x, weight, bias, A, B, d, s, layout)
