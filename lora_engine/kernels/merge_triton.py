"""Grouped, fused merge / unmerge on CUDA: one launch per group of same-shape layers, one pass over the weights.

merge.py's reference path runs ~15 tensor ops per layer (delta GEMM, fp32 copies, bit arithmetic, a sync per
layer for the overflow list): about 70 bytes of traffic per weight element and hundreds of launches. Here:
  check pass  (read W)              W' = rnd(W + delta), back = rnd(W' - delta), c = bits(W) - bits(back):
                                    count non-finite W' (refuse before writing) and |c| > 127 (overflow list size)
  apply pass  (read W, write W, c)  W <- W', correction c as int8, overflow originals to an exact-size list
  unmerge     (read W', c, write W) W <- bits(rnd(W' - delta)) + c, then the overflow originals scattered back
delta = sum_a s_a B_a A_a is recomputed in every pass from a snapshot of the factors (fp32, IEEE dot: no TF32),
always by the same code, so `back` is bit-identical between merge and unmerge. About 5 bytes per element per
pass; the only host sync is the one that reads the check pass's counts.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheel has no triton: merge.py uses its PyTorch path
    triton = None

BM, BN = 64, 128
_BITS = {torch.bfloat16: 16, torch.float16: 16, torch.float32: 32}


def available(weights: list[Tensor], factors: list[Tensor]) -> bool:
    """The fused path applies to CUDA weights in bf16/fp16/fp32 with fp32 adapter factors."""
    return (triton is not None and bool(weights) and all(w.is_cuda and w.dtype in _BITS and w.dim() == 2
                                                         for w in weights)
            and all(f.is_cuda and f.dtype == torch.float32 for f in factors))


if triton is not None:
    @triton.jit
    def _delta(P_tab, Q_tab, S_tab, layer, offs_m, offs_n, M, N, NA: tl.constexpr, R: tl.constexpr,
               RP: tl.constexpr, spm, spr, sqr, sqn):
        """fp32 tile of sum_a s_a P_a Q_a; P_a [M, R], Q_a [R, N] addressed by strides (both layouts)."""
        r = tl.arange(0, RP)
        acc = tl.zeros((offs_m.shape[0], offs_n.shape[0]), dtype=tl.float32)
        for a in tl.static_range(NA):
            p_ptr = tl.load(P_tab + layer * NA + a).to(tl.pointer_type(tl.float32))
            q_ptr = tl.load(Q_tab + layer * NA + a).to(tl.pointer_type(tl.float32))
            s = tl.load(S_tab + layer * NA + a)
            p = tl.load(p_ptr + offs_m[:, None] * spm + r[None, :] * spr,
                        mask=(offs_m[:, None] < M) & (r[None, :] < R), other=0.0)
            q = tl.load(q_ptr + r[:, None] * sqr + offs_n[None, :] * sqn,
                        mask=(r[:, None] < R) & (offs_n[None, :] < N), other=0.0)
            acc += tl.dot(p * s, q, input_precision="ieee")
        return acc

    @triton.jit
    def _bits(x, BITS: tl.constexpr):
        if BITS == 16:
            out = x.to(tl.int16, bitcast=True).to(tl.int32)
        else:
            out = x.to(tl.int32, bitcast=True).to(tl.int64)
        return out

    @triton.jit
    def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's rows, columns, in-bounds mask and flat element offsets of a row-major [M, N] weight."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        return offs_m, offs_n, mask, offs_m[:, None].to(tl.int64) * N + offs_n[None, :]

    @triton.jit
    def _merge_kernel(W0, W_tab, C_tab, P_tab, Q_tab, S_tab, counts, ov_base, cursor, ov_layer, ov_index, ov_value,
                      M, N, spm, spr, sqr, sqn, NA: tl.constexpr, R: tl.constexpr, RP: tl.constexpr,
                      BITS: tl.constexpr, APPLY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        layer = tl.program_id(2)
        offs_m, offs_n, mask, flat = _tile(M, N, BLOCK_M, BLOCK_N)
        w_ptr = tl.load(W_tab + layer).to(W0.dtype)
        w = tl.load(w_ptr + flat, mask=mask, other=0.0)
        delta = _delta(P_tab, Q_tab, S_tab, layer, offs_m, offs_n, M, N, NA, R, RP, spm, spr, sqr, sqn)
        new = (w.to(tl.float32) + delta).to(w.dtype)
        back = (new.to(tl.float32) - delta).to(w.dtype)
        diff = _bits(w, BITS) - _bits(back, BITS)
        over = mask & ((diff > 127) | (diff < -127))
        if APPLY:
            tl.store(w_ptr + flat, new, mask=mask)
            c_ptr = tl.load(C_tab + layer).to(tl.pointer_type(tl.int8))
            tl.store(c_ptr + flat, tl.where(over, 0, diff).to(tl.int8), mask=mask)
            n_over = tl.sum(tl.sum(over.to(tl.int32), 1), 0)
            if n_over > 0:  # rare: reserve a run of slots for the whole tile with one atomic, then a prefix sum
                start = tl.atomic_add(cursor + layer, n_over)
                o = tl.reshape(over, [BLOCK_M * BLOCK_N])
                pos = tl.load(ov_base + layer) + start + tl.cumsum(o.to(tl.int32), 0) - 1
                tl.store(ov_index + pos, tl.reshape(flat, [BLOCK_M * BLOCK_N]), mask=o)
                tl.store(ov_value + pos, tl.reshape(w, [BLOCK_M * BLOCK_N]), mask=o)
                tl.store(ov_layer + pos, layer + tl.zeros_like(pos).to(tl.int32), mask=o)
        else:
            newf = new.to(tl.float32)
            bad = mask & ((newf - newf) != 0.0)  # NaN or +-inf
            tl.atomic_add(counts + 2 * layer, tl.sum(tl.sum(bad.to(tl.int32), 1), 0))
            tl.atomic_add(counts + 2 * layer + 1, tl.sum(tl.sum(over.to(tl.int32), 1), 0))

    @triton.jit
    def _unmerge_kernel(W0, W_tab, O_tab, C_tab, P_tab, Q_tab, S_tab, M, N, spm, spr, sqr, sqn, NA: tl.constexpr,
                        R: tl.constexpr, RP: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
        layer = tl.program_id(2)
        offs_m, offs_n, mask, flat = _tile(M, N, BLOCK_M, BLOCK_N)
        w_ptr = tl.load(W_tab + layer).to(W0.dtype)
        o_ptr = tl.load(O_tab + layer).to(W0.dtype)
        c_ptr = tl.load(C_tab + layer).to(tl.pointer_type(tl.int8))
        new = tl.load(w_ptr + flat, mask=mask, other=0.0)
        delta = _delta(P_tab, Q_tab, S_tab, layer, offs_m, offs_n, M, N, NA, R, RP, spm, spr, sqr, sqn)
        back = (new.to(tl.float32) - delta).to(new.dtype)
        c = tl.load(c_ptr + flat, mask=mask, other=0)
        if BITS == 16:
            out = (_bits(back, BITS) + c.to(tl.int32)).to(tl.int16).to(new.dtype, bitcast=True)
        else:
            out = (_bits(back, BITS) + c.to(tl.int64)).to(tl.int32).to(new.dtype, bitcast=True)
        tl.store(o_ptr + flat, out, mask=mask)

    @triton.jit
    def _scatter_kernel(W0, O_tab, ov_layer, ov_index, ov_value, total, BLOCK: tl.constexpr):
        k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = k < total
        layer = tl.load(ov_layer + k, mask=m, other=0)
        o_ptr = tl.load(O_tab + layer, mask=m, other=0).to(W0.dtype)
        tl.store(o_ptr + tl.load(ov_index + k, mask=m, other=0), tl.load(ov_value + k, mask=m), mask=m)


@dataclasses.dataclass
class Group:
    """Layers merged together by one launch: same weight shape/dtype/layout and the same adapter ranks."""

    weights: list[Tensor]
    corrections: list[Tensor]
    factors: Tensor  # flat fp32 snapshot of every A_a and B_a of the group (the delta is recomputed from it)
    tables: dict[str, Tensor]  # device pointer tables: W, C, P, Q (int64) and S (fp32 scales)
    shape: tuple[int, int]
    strides: tuple[int, int, int, int]
    ranks: tuple[int, ...]
    ov_layer: Tensor | None = None
    ov_index: Tensor | None = None
    ov_value: Tensor | None = None
    ov_total: int = 0  # entries in the overflow list (set by apply)

    def nbytes(self) -> int:
        extra = [self.factors, *self.tables.values(), *self.corrections]
        extra += [t for t in (self.ov_layer, self.ov_index, self.ov_value) if t is not None]
        return sum(t.numel() * t.element_size() for t in extra)


def build_group(weights: list[Tensor], layout: str, factors: list[list[tuple[Tensor, Tensor, float]]]) -> Group:
    """Snapshot the factors (one cat) and build the pointer tables. factors[layer] = [(A_a, B_a, s_a), ...]."""
    dev, W0 = weights[0].device, weights[0]
    if len({A.shape[0] for per in factors for A, _, _ in per}) != 1:
        raise ValueError("fused merge needs one rank for every adapter of a group (merge.py falls back otherwise)")
    ranks = tuple(A.shape[0] for A, _, _ in factors[0])
    parts = [t.reshape(-1) for per in factors for A, B, _ in per for t in (A.detach(), B.detach())]
    flat = torch.cat(parts)
    ptrs, off = [], 0
    for t in parts:
        ptrs.append(flat.data_ptr() + 4 * off)
        off += t.numel()
    A_ptrs, B_ptrs = ptrs[0::2], ptrs[1::2]
    M, N = W0.shape
    R = ranks[0]
    if layout == "out_in":  # W [out, in]: P = B [out, R], Q = A [R, in]
        P, Q, strides = B_ptrs, A_ptrs, (R, 1, N, 1)
    else:  # W [in, out]: P = A^T (P[m, r] = A[r, m]), Q = B^T (Q[r, n] = B[n, r])
        P, Q, strides = A_ptrs, B_ptrs, (1, M, 1, R)
    corrections = torch.empty(len(weights), M * N, dtype=torch.int8, device=dev)
    cs = [corrections[i].view(M, N) for i in range(len(weights))]
    scales = [s for per in factors for _, _, s in per]
    host = torch.tensor([[w.data_ptr() for w in weights], [c.data_ptr() for c in cs]], dtype=torch.int64)
    pq = torch.tensor([P, Q], dtype=torch.int64)
    tables = {"W": host[0], "C": host[1], "P": pq[0], "Q": pq[1], "S": torch.tensor(scales, dtype=torch.float32)}
    tables = {k: v.to(dev) for k, v in tables.items()}
    return Group(list(weights), cs, flat, tables, (M, N), strides, ranks)


def _launch_args(g: Group):
    M, N = g.shape
    R = g.ranks[0]
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN), len(g.weights))
    return grid, dict(NA=len(g.ranks), R=R, RP=max(16, triton.next_power_of_2(R)), BITS=_BITS[g.weights[0].dtype],
                      BLOCK_M=BM, BLOCK_N=BN)


def check(g: Group) -> Tensor:
    """Launch the read-only pass; returns a device tensor [layers, 2]: (non-finite W', overflow corrections)."""
    grid, kw = _launch_args(g)
    counts = torch.zeros(len(g.weights), 2, dtype=torch.int32, device=g.weights[0].device)
    t, dummy = g.tables, counts
    _merge_kernel[grid](g.weights[0], t["W"], t["C"], t["P"], t["Q"], t["S"], counts, dummy, dummy, dummy, dummy,
                        g.weights[0], *g.shape, *g.strides, APPLY=False, **kw)
    return counts


def apply(g: Group, overflow_counts: list[int]) -> None:
    """Write W' and the corrections; the overflow list is sized exactly from the check pass."""
    dev, total = g.weights[0].device, sum(overflow_counts)
    base = torch.tensor([0] + overflow_counts[:-1], dtype=torch.int64).cumsum(0).to(dev)
    cursor = torch.zeros(len(g.weights), dtype=torch.int32, device=dev)
    g.ov_layer = torch.empty(max(total, 1), dtype=torch.int32, device=dev)
    g.ov_index = torch.empty(max(total, 1), dtype=torch.int64, device=dev)
    g.ov_value = torch.empty(max(total, 1), dtype=g.weights[0].dtype, device=dev)
    grid, kw = _launch_args(g)
    t = g.tables
    _merge_kernel[grid](g.weights[0], t["W"], t["C"], t["P"], t["Q"], t["S"], cursor, base, cursor, g.ov_layer,
                        g.ov_index, g.ov_value, *g.shape, *g.strides, APPLY=True, **kw)
    g.ov_total = total


def restore(g: Group, out: list[Tensor] | None = None, only: int | None = None) -> None:
    """Unmerge: write the original bits into the weights (or into `out`, leaving the weights as they are).

    `only`: restore just that layer of the group (into out[0]), e.g. to fingerprint a merged model's base.
    """
    t = dict(g.tables)
    if only is not None:
        t = {k: v[only:only + 1] if k in ("W", "C") else v for k, v in t.items()}
        na = len(g.ranks)
        t["P"], t["Q"], t["S"] = (t[k][only * na:(only + 1) * na] for k in ("P", "Q", "S"))
    t["O"] = (torch.tensor([o.data_ptr() for o in out], dtype=torch.int64).to(g.weights[0].device)
              if out is not None else t["W"])
    grid, kw = _launch_args(g)
    grid = (grid[0], grid[1], 1 if only is not None else grid[2])
    _unmerge_kernel[grid](g.weights[0], t["W"], t["O"], t["C"], t["P"], t["Q"], t["S"], *g.shape, *g.strides, **kw)
    total = g.ov_total
    if total:
        layer, index, value = g.ov_layer[:total], g.ov_index[:total], g.ov_value[:total]
        if only is not None:
            keep = layer == only
            layer, index, value = torch.zeros_like(layer[keep]), index[keep], value[keep]
        if layer.numel():
            _scatter_kernel[(triton.cdiv(layer.numel(), 1024),)](g.weights[0], t["O"], layer, index, value,
                                                                 layer.numel(), BLOCK=1024)
