"""The training LoRA linear in the forms torch.compile can see, chosen per layer by `LoRALayer.compiled_form`.

On the H200 host every cuBLAS call costs ~40 us of CPU (dispatch, heuristics, launch), and a compiled training step
is as much host-bound as an eager one (benchmarks/NOTES.md (13)):
  "gemm"   (the default) functional._LoRALinearFn traced as it is: six cuBLAS calls per layer beyond the base's two.
           Measured 1.03x PEFT's compiled step (PEFT traces the same products).
  "rank1"  the up-projections y += (h d) B^T and dx += (u d) A written as R rank-1 terms, a pointwise expression
           Inductor fuses into the neighbouring kernels: four cuBLAS calls per layer beyond the base's two
           (h = x A^T, u = dy B, dA, dB stay GEMMs). Correct and tested on CPU; its GPU time is not measured yet
           (benchmarks/bench_train.py times both forms side by side), so it is opt-in.
Tried and measured worse: every rank-sized product as an Inductor reduction (Inductor fused them with the GELU
backward and recomputed it per rank: 1.17x PEFT, kernel time 3x the floor's), and the eager code as opaque
torch.library ops (the Python of every op call came back: 1.38x PEFT).
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
    """The "rank1" form: y = base(x) + ((x A^T) * d) B^T, the up-projections as rank-1 terms (see above)."""

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
                s: float | None = None, form: str = "gemm") -> Tensor:
    """functional.lora_linear's training form while dynamo traces, in `form` ("gemm" or "rank1", see above)."""
    if form == "gemm":
        return _LoRALinearFn.apply(x, weight, bias, A, B, d, s, layout, None)
    if form == "rank1":
        return _LoRALinearTracedFn.apply(x, weight, bias, A, B, d, s, layout)
    raise ValueError(f"LoRALayer.compiled_form must be 'gemm' or 'rank1', got {form!r}")
