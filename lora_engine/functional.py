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

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def base_linear(x: Tensor, weight: Tensor, bias: Tensor | None, layout: str) -> Tensor:
    """The base layer alone, computed exactly as nn.Linear / transformers Conv1D compute it."""
    if layout == "out_in":
        return F.linear(x, weight, bias)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # the fast paths pass 2-D x: no reshape, no view
    y = torch.addmm(bias, x2, weight) if bias is not None else x2 @ weight
    return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[1])


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t.to(dtype), without the call when t already has it: a no-op `.to` still costs a few us of host per call,
    and the training path asks six times per layer and step (host time is what these steps are bound by)."""
    return t if t.dtype == dtype else t.to(dtype)


def scale_rows(h: Tensor, d: Tensor, batch: int) -> Tensor:
    """h [N, R] * d, where d is [R] (one mix) or [batch, R] (a mix per row; N = batch * tokens)."""
    if d.dim() == 1:
        return h * d
    return (h.view(batch, -1, h.shape[-1]) * d.unsqueeze(1)).view(h.shape)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the GEMMs run in: autocast's when it is on (no fp32 copy of x), else x's own."""
    dev = x.device.type
    if x.dtype in (torch.float32, torch.float16, torch.bfloat16) and _autocast_available(dev) \
            and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


_AUTOCAST_AVAILABLE: dict[str, bool] = {}


def _autocast_available(dev: str) -> bool:
    """torch.amp.is_autocast_available, asked once per device type: dynamo (torch 2.11) cannot trace that builtin,
    and a graph break in every LoRA layer made compiled training 2.6x slower than PEFT's."""
    ok = _AUTOCAST_AVAILABLE.get(dev)
    if ok is None:
        if torch.compiler.is_compiling():
            return dev in ("cuda", "cpu")  # not asked eagerly yet: the two device types torch always has
        ok = _AUTOCAST_AVAILABLE[dev] = torch.amp.is_autocast_available(dev)
    return ok


def check_rows(x: Tensor, d: Tensor) -> None:
    if d.dim() == 2 and (x.dim() < 2 or x.shape[0] != d.shape[0]):
        raise ValueError(f"per-row blend weights have length {d.shape[0]} but the input batch is "
                         f"{tuple(x.shape)}: give one weight per row of dim 0, or use float weights")


def _mm(a: Tensor, b: Tensor, alpha: float, out_dtype: torch.dtype) -> Tensor:
    """alpha * (a @ b) as `out_dtype`: one kernel on CUDA (fp32 output straight from the bf16/fp16 GEMM)."""
    if a.is_cuda and a.dtype != out_dtype and not torch.compiler.is_compiling():
        mode = _mixed_addmm(a.device.type)
        if mode == "zero":  # a 0-d zero as the (ignored, beta=0) input: no output buffer made first
            return torch.addmm(_zero(a.device, out_dtype), a, b, out_dtype=out_dtype, beta=0, alpha=alpha)
        if mode == "empty":
            return torch.addmm(a.new_empty(a.shape[0], b.shape[1], dtype=out_dtype), a, b, out_dtype=out_dtype,
                               beta=0, alpha=alpha)
    out = a @ b if alpha == 1.0 else torch.addmm(a.new_empty(a.shape[0], b.shape[1]), a, b, beta=0, alpha=alpha)
    return out.to(out_dtype)


@functools.lru_cache(maxsize=None)
def _mixed_addmm(device_type: str) -> str | None:
    """How this torch takes addmm(..., out_dtype=float32) for bf16 inputs on this device (probed once): "zero" with
    a broadcast 0-d input, "empty" with a full output-sized one, None not at all."""
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], device=device_type, dtype=torch.bfloat16)
    want = 2.0 * (a.float() @ a.float())
    for mode in ("zero", "empty"):
        c = _zero(a.device, torch.float32) if mode == "zero" else a.new_empty(2, 2, dtype=torch.float32)
        try:
            got = torch.addmm(c, a, a, out_dtype=torch.float32, beta=0, alpha=2.0)
        except (RuntimeError, TypeError, NotImplementedError):
            continue
        if got.dtype == torch.float32 and got.shape == want.shape and torch.equal(got, want):
            return mode
    return None


@functools.lru_cache(maxsize=None)
def _zero(device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.zeros((), device=device, dtype=dtype)


MAX_UNROLLED_RANK = 16  # rank_terms above this rank go back to a GEMM (the unrolled sum would grow the kernels)


def add_product(out: Tensor, P: Tensor, Q: Tensor, alpha: float, rank_terms: bool) -> Tensor:
    """out + alpha * P Q^T for P [N, R], Q [M, R] of rank size R.

    GEMM form: accumulated into `out` itself (addmm_, no extra pass). rank_terms: R rank-1 terms in fp32, a pointwise
    expression Inductor fuses into the kernels around it (compiled_op.py's "rank1" form); returned in fp32 for the
    caller to round once."""
    if not rank_terms or P.shape[1] > MAX_UNROLLED_RANK:
        return out.addmm_(P, Q.t(), alpha=alpha)
    acc, Pf = out.float(), P.float() * alpha
    for r in range(P.shape[1]):
        acc = acc + Pf[:, r:r + 1] * Q[:, r].float()
    return acc


def lora_forward(x2: Tensor, weight: Tensor, bias: Tensor | None, Ac: Tensor, Bc: Tensor, d: Tensor,
                 s: float | None, batch: int, layout: str, form: str = "gemm", kept: bool = False
                 ) -> tuple[Tensor, Tensor]:
    """Training forward on 2-D x2 already in the compute dtype, factors cast: (y, h = x2 Ac^T).

    y = base(x2) + (h * d) Bc^T (`add_product`); `s` (a float) is the scale when the blend is one uniform scale:
    folded into the product's alpha, no kernels. `form` (compiled_op.py): "gemm" three GEMMs; "rank1" the
    up-projection as rank-1 terms; "cat" also h from the base GEMM itself: x2 [W; Ac]^T = [base | h] (the R extra
    output features ride along in one cuBLAS call), the bias added with the rank-1 terms. `kept`: `weight` is the
    [W; Ac] train_casts.py keeps cast ([out + R, in], "out_in") and `bias` its [b; 0]: the same single GEMM without
    the cat; y is then a view of [base | h] (row stride out + R), h a copy (saving the view would keep it all)."""
    rank_terms = _rank_terms(form)
    if kept:
        out_dim = weight.shape[0] - Ac.shape[0]
        y_ext = base_linear(x2, weight, bias, "out_in")
        y, h = y_ext[:, :out_dim], y_ext[:, out_dim:].contiguous()
    elif form == "cat":
        out_dim = weight.shape[0] if layout == "out_in" else weight.shape[1]
        y_ext = _base_in(x2, _append_out(_as(weight, x2.dtype), Ac, layout), None, x2.dtype, layout)
        y, h = y_ext[:, :out_dim], y_ext[:, out_dim:]
    else:
        y = _base_in(x2, weight, bias, x2.dtype, layout)
        h = x2 @ Ac.t()
    hd = scale_rows(h, d.to(x2.dtype), batch) if s is None else h
    y = add_product(y, hd, Bc, 1.0 if s is None else s, rank_terms)
    if form == "cat" and not kept:  # above MAX_UNROLLED_RANK without a bias y is still the view of [base | h]
        y = (y + bias.float()) if bias is not None else y.contiguous()
    return (y.to(x2.dtype) if rank_terms else y), h


def _rank_terms(form: str) -> bool:
    """Whether `form` adds the up-projections as rank-1 terms (the traced forms) rather than GEMMs."""
    return form in ("rank1", "cat")


def _append_out(w: Tensor, Ac: Tensor, layout: str) -> Tensor:
    """The base weight with Ac's R rows appended as extra output features, in the weight's own layout."""
    return torch.cat([w, Ac], 0) if layout == "out_in" else torch.cat([w, Ac.t()], 1)


def lora_backward(dy2: Tensor, x2: Tensor, weight: Tensor, Ac: Tensor, Bc: Tensor, h: Tensor, d: Tensor,
                  s: float | None, batch: int, layout: str, needs: tuple[bool, bool, bool],
                  grad_dtypes: tuple[torch.dtype, torch.dtype], form: str = "gemm"
                  ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dx2, dA, dB) for `lora_forward`; `needs` says which are wanted. dA/dB come back in `grad_dtypes` (the
    parameters' own dtypes: fp32 masters), written straight from the low-precision GEMM where torch can. In the
    "cat" form dy [W^T | Bc] = [dx's base part | u] is one GEMM when dx is wanted."""
    ct, rank_terms = x2.dtype, _rank_terms(form)
    dy2 = _as(dy2, ct)
    w = _as(weight, ct) if needs[0] else None
    wt = None if w is None else (w if layout == "out_in" else w.t())  # [out, in]
    if form == "cat" and wt is not None:
        dxu = dy2 @ torch.cat([wt, Bc], 1)
        dx, u = dxu[:, :wt.shape[1]], dxu[:, wt.shape[1]:]
    else:
        dx, u = (None if wt is None else dy2 @ wt), dy2 @ Bc  # u [N, R]: dL/d(x A^T) = u * d
    if s is None:
        dc = d.to(ct)
        u, h, s = scale_rows(u, dc, batch), scale_rows(h, dc, batch), 1.0
    dA = dB = None
    if dx is not None:
        dx = add_product(dx, u, Ac.t(), s, rank_terms)
    if needs[1]:
        dA = _mm(u.t(), x2, s, grad_dtypes[0])
    if needs[2]:
        dB = _mm(dy2.t(), h, s, grad_dtypes[1])
    return dx, dA, dB


class _LoRALinearFn(torch.autograd.Function):
    """Frozen-base LoRA with a hand-written backward (eager training, and what torch.compile traces: compiled_op.py;
    `form` is one of compiled_op.FORMS: "gemm" in eager training).

    Saved: x (cast once), A/B cast once, and h = x A^T ([N, R]: R/out of y's size; recomputing it would cost a
    kernel launch per layer, which is what dominates at these shapes). The base weight is NOT saved in the
    compute dtype: it is recast in backward (no copy at all when the base is stored in that dtype), unless
    train_casts.py keeps it cast (`casts`: its Copies.tensors(), (Ac, Bc, base, bias), `base` [W as [out, in]; Ac] or
    None: lora_forward's `kept`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, d, s, layout, casts, form):
        ct = compute_dtype(x)
        x2 = _as(x.reshape(-1, x.shape[-1]), ct)
        ready = casts is not None and casts[0].dtype == ct
        kept = ready and casts[2] is not None
        if ready:
            Ac, Bc = casts[0], casts[1]
            if kept:
                weight, bias, layout = casts[2], casts[3], "out_in"
        else:
            Ac, Bc = A.to(ct), B.to(ct)
        y, h = lora_forward(x2, weight, bias, Ac, Bc, d, s, x.shape[0], layout, form, kept)
        if kept:
            weight = weight[:weight.shape[0] - Ac.shape[0]]  # W [out, in] in ct: dx = dy W reads it, no cast
        ctx.save_for_backward(x2, weight, Ac, Bc, h, d)
        ctx.s, ctx.layout, ctx.x_shape, ctx.x_dtype, ctx.form = s, layout, x.shape, x.dtype, form
        ctx.grad_dtypes = (A.dtype, B.dtype)  # gradients go back in the parameters' dtype (fp32 masters)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, Ac, Bc, h, d = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dA, dB = lora_backward(dy.reshape(-1, dy.shape[-1]), x2, weight, Ac, Bc, h, d, ctx.s, ctx.x_shape[0],
                                   ctx.layout, (need[0], need[3], need[4]), ctx.grad_dtypes, ctx.form)
        if dx is not None:
            dx = _as(dx.view(ctx.x_shape), ctx.x_dtype)
        return dx, None, None, dA, dB, None, None, None, None, None


class _KeptLoRAFn(torch.autograd.Function):
    """Eager training's usual case in as few torch calls as it takes: one adapter at one uniform scale `s` on a base
    kept cast by train_casts.py. `kept` is its Copies.kept: views made once per cast base, (K^T, bias, W, Ac, Bc,
    Bc^T) with K = [W; Ac] ([out + R, in]) and the bias [b; 0] (or None).

    The same GEMMs as _LoRALinearFn's "gemm" form on a kept base (lora_forward / lora_backward with `kept`, which
    torch.compile traces), without their general branches: an eager step at these shapes is bound by the host, where
    every torch call costs tens of microseconds (benchmarks/NOTES.md (23)). Forward: [base | h] = x K^T (+ bias) in
    one GEMM, y = base + s h Bc^T accumulated in place. Backward: u = dy Bc, dx = dy W + s u Ac, dA = s u^T x,
    dB = s dy^T h (fp32, straight from the GEMMs on CUDA)."""

    @staticmethod
    def forward(ctx, x, A, B, kept, s):
        KT, bias, W, Ac, Bc, BcT = kept
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype != W.dtype:
            x2 = x2.to(W.dtype)
        y_ext = torch.mm(x2, KT) if bias is None else torch.addmm(bias, x2, KT)
        out = W.shape[0]
        h = y_ext[:, out:].contiguous()  # [N, R]; saving the view would keep all of [base | h] until backward
        y = y_ext[:, :out].addmm_(h, BcT, alpha=s)
        ctx.save_for_backward(x2, h, W, Ac, Bc)
        ctx.s, ctx.x_shape, ctx.x_dtype, ctx.grad_dtypes = s, x.shape, x.dtype, (A.dtype, B.dtype)
        return y.view(*x.shape[:-1], out)

    @staticmethod
    def backward(ctx, dy):
        x2, h, W, Ac, Bc = ctx.saved_tensors
        s, need = ctx.s, ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])
        if dy2.dtype != x2.dtype:
            dy2 = dy2.to(x2.dtype)
        u = torch.mm(dy2, Bc)
        dx = dA = dB = None
        if need[0]:
            dx = torch.mm(dy2, W).addmm_(u, Ac, alpha=s).view(ctx.x_shape)
            dx = dx if dx.dtype == ctx.x_dtype else dx.to(ctx.x_dtype)
        if need[1]:
            dA = _mm(u.t(), x2, s, ctx.grad_dtypes[0])
        if need[2]:
            dB = _mm(dy2.t(), h, s, ctx.grad_dtypes[1])
        return dx, dA, dB, None, None


def kept_lora_linear(x: Tensor, A: Tensor, B: Tensor, kept: tuple, s: float) -> Tensor:
    """Training forward of one adapter (A, B) at scale `s` on a kept cast base: see _KeptLoRAFn."""
    return _KeptLoRAFn.apply(x, A, B, kept, s)


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, d: Tensor,
                layout: str, s: float | None = None, casts=None) -> Tensor:
    """Fast path for a frozen base: y = base(x) + ((x A^T) * d) B^T in one output buffer.

    `s`: when not None, d is that one uniform scale (the usual single-adapter case), applied in training as the
    GEMMs' alpha. `casts`: train_casts.Copies.tensors() (A and B already in the compute dtype, exactly A.to(dtype),
    B.to(dtype), and maybe the base kept cast), used when that dtype is the one autocast picks. Under no_grad this is
    the uncached inference form (layers cache the cast factors and call `lora_linear_cached`).
    """
    check_rows(x, d)
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad):
        return _LoRALinearFn.apply(x, weight, bias, A, B, d, s, layout, casts, "gemm")
    ct = compute_dtype(x)  # d stays a tensor here: no recompile under torch.compile when the blend changes
    rows = None if d.dim() == 1 else d
    return lora_linear_cached(x, weight, bias, A.to(ct), fold_scale(B, d, ct), rows, layout)


def fold_scale(B: Tensor, d: Tensor, dtype: torch.dtype) -> Tensor:
    """B diag(d) in `dtype` (B alone when d is per row: it is applied to h then), folded in at least fp32."""
    wide = torch.promote_types(dtype, torch.float32)
    return (B.to(wide) * d.to(wide) if d.dim() == 1 else B.to(wide)).to(dtype)


def _base_in(x2: Tensor, weight: Tensor, bias: Tensor | None, ct: torch.dtype, layout: str) -> Tensor:
    """The base layer on 2-D x in the compute dtype, into a fresh buffer the LoRA term is accumulated into."""
    return base_linear(x2, _as(weight, ct), None if bias is None else _as(bias, ct), layout)


def lora_linear_cached(x: Tensor, weight: Tensor, bias: Tensor | None, Ac: Tensor, Bd: Tensor,
                       rows: Tensor | None, layout: str) -> Tensor:
    """Inference: y = base(x) + ((x Ac^T) [* rows]) Bd^T with factors already cast (and d folded into Bd
    unless it is per row): two small GEMMs and nothing else per layer."""
    ct = Ac.dtype
    x2 = _as(x.reshape(-1, x.shape[-1]), ct)
    y = _base_in(x2, weight, bias, ct, layout)
    h = x2 @ Ac.t()
    if rows is not None:
        h = scale_rows(h, rows.to(ct), x.shape[0])
    y.addmm_(h, Bd.t())
    return y.view(*x.shape[:-1], y.shape[-1])


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
