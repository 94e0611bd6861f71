"""Where the fused forward GEMM loses to cuBLAS: its main loop alone in variants, at the GPT shapes (M = 4096, bf16).

    python benchmarks/probe_gemm.py        # on the GPU, about a minute

Each row: a tile config; each cell: a variant's GPU time over cuBLAS's (torch.mm), both timed in CUDA graphs
(do_bench_cudagraph: no host time). Variants: `ptr` pointer loads as lora_train_triton's _gemm_tile makes them,
`tma` host TensorDescriptors (TMA loads and store), `tmaP` the same persistent (one program per SM); `+epi` the
rank-R term s p Q^T added after the main loop as the engine does ((acc / s + p Q^T) s), `+pro` added before it.
Every `+epi` / `+pro` output is checked against fp32 (relative norm < 1e-2). NOTES.md (30).
"""
import sys, torch, triton, triton.language as tl
from triton.testing import do_bench_cudagraph as do_bench
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

@triton.jit
def _ptr(a_ptr, w_ptr, p_ptr, q_ptr, out_ptr, s, M, N, K, R, MASK: tl.constexpr, EPI: tl.constexpr,
         R_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GM: tl.constexpr):
    pid = tl.program_id(0)
    npm, npn = tl.cdiv(M, BM), tl.cdiv(N, BN)
    g = pid // (GM * npn); fm = g * GM; gs = min(npm - fm, GM)
    pm = fm + (pid % (GM * npn)) % gs; pn = (pid % (GM * npn)) // gs
    om = pm * BM + tl.arange(0, BM); on = pn * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if EPI == 2:
        orr = tl.arange(0, R_PAD)
        p = tl.load(p_ptr + om[:, None] * R + orr[None, :], mask=orr[None, :] < R, other=0.0)
        q = tl.load(q_ptr + on[None, :] * R + orr[:, None], mask=orr[:, None] < R, other=0.0)
        acc = tl.dot(p, q, acc) * s
    for k0 in range(0, K, BK):
        ok = k0 + tl.arange(0, BK)
        if MASK:
            a = tl.load(a_ptr + om[:, None] * K + ok[None, :], mask=(om[:, None] < M) & (ok[None, :] < K), other=0.0)
            w = tl.load(w_ptr + on[None, :] * K + ok[:, None], mask=(ok[:, None] < K) & (on[None, :] < N), other=0.0)
        else:
            a = tl.load(a_ptr + om[:, None] * K + ok[None, :])
            w = tl.load(w_ptr + on[None, :] * K + ok[:, None])
        acc = tl.dot(a, w, acc)
    if EPI == 1:
        orr = tl.arange(0, R_PAD)
        p = tl.load(p_ptr + om[:, None] * R + orr[None, :], mask=orr[None, :] < R, other=0.0)
        q = tl.load(q_ptr + on[None, :] * R + orr[:, None], mask=orr[:, None] < R, other=0.0)
        acc = tl.dot(p, q, acc * (1.0 / s)) * s
    tl.store(out_ptr + om[:, None] * N + on[None, :], acc.to(out_ptr.dtype.element_ty))

@triton.jit
def _tma(a_desc, w_desc, o_desc, p_ptr, q_ptr, s, M, N, K, R, EPI: tl.constexpr, R_PAD: tl.constexpr,
         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GM: tl.constexpr, PERSIST: tl.constexpr,
         NUM_SMS: tl.constexpr):
    npm, npn = tl.cdiv(M, BM), tl.cdiv(N, BN)
    start = tl.program_id(0)
    step = NUM_SMS if PERSIST else npm * npn
    for pid in tl.range(start, npm * npn, step, flatten=PERSIST):
        g = pid // (GM * npn); fm = g * GM; gs = min(npm - fm, GM)
        pm = fm + (pid % (GM * npn)) % gs; pn = (pid % (GM * npn)) // gs
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if EPI == 2:
            om = pm * BM + tl.arange(0, BM); on = pn * BN + tl.arange(0, BN); orr = tl.arange(0, R_PAD)
            p = tl.load(p_ptr + om[:, None] * R + orr[None, :], mask=orr[None, :] < R, other=0.0)
            q = tl.load(q_ptr + on[None, :] * R + orr[:, None], mask=orr[:, None] < R, other=0.0)
            acc = tl.dot(p, q, acc) * s
        for k0 in range(0, K, BK):
            a = a_desc.load([pm * BM, k0])
            w = w_desc.load([pn * BN, k0])
            acc = tl.dot(a, w.T, acc)
        if EPI == 1:
            om = pm * BM + tl.arange(0, BM); on = pn * BN + tl.arange(0, BN); orr = tl.arange(0, R_PAD)
            p = tl.load(p_ptr + om[:, None] * R + orr[None, :], mask=orr[None, :] < R, other=0.0)
            q = tl.load(q_ptr + on[None, :] * R + orr[:, None], mask=orr[:, None] < R, other=0.0)
            acc = tl.dot(p, q, acc * (1.0 / s)) * s
        o_desc.store([pm * BM, pn * BN], acc.to(o_desc.dtype))

SHAPES = [("c_attn", 1280, 3840), ("attn.c_proj", 1280, 1280), ("c_fc", 1280, 5120), ("mlp.c_proj", 5120, 1280)]
CFGS = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 4, 4)]
M, R = 4096, 8


def main() -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(torch.cuda.get_device_name(), triton.__version__)
    for name, K, N in SHAPES:
        a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        p = torch.randn(M, R, device="cuda", dtype=torch.bfloat16); q = torch.randn(N, R, device="cuda", dtype=torch.bfloat16)
        want = (a.float() @ W.float().t() + 0.5 * p.float() @ q.float().t())
        out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        cub = do_bench(lambda: torch.mm(a, W.t(), out=out))
        print(f"{name} cuBLAS {cub * 1e3:.1f} us")
        for BM, BN, BK, nw, ns in CFGS:
            row = []
            for label, fn in [
                ("ptr", lambda epi, mask: _ptr[(triton.cdiv(M, BM) * triton.cdiv(N, BN),)](a, W, p, q, out, 0.5, M, N, K, R, mask, epi, 16, BM, BN, BK, 8, num_warps=nw, num_stages=ns)),
                ("tma", "tma"), ("tmaP", "tmaP")]:
                for epi, mask in ((1, True), (2, True), (0, True)) if label == "ptr" else ((1, None), (2, None), (0, None)):
                    try:
                        if label != "ptr":
                            if TensorDescriptor is None: raise RuntimeError("no TensorDescriptor")
                            ad, wd, od = (TensorDescriptor.from_tensor(a, [BM, BK]), TensorDescriptor.from_tensor(W, [BN, BK]),
                                          TensorDescriptor.from_tensor(out, [BM, BN]))
                            pers = label == "tmaP"
                            grid = (min(sms, triton.cdiv(M, BM) * triton.cdiv(N, BN)) if pers else triton.cdiv(M, BM) * triton.cdiv(N, BN),)
                            f = lambda: _tma[grid](ad, wd, od, p, q, 0.5, M, N, K, R, epi, 16, BM, BN, BK, 8, pers, sms, num_warps=nw, num_stages=ns)
                        else:
                            f = lambda: fn(epi, mask)
                        f(); torch.cuda.synchronize()
                        if epi:
                            err = ((out.float() - want).norm() / want.norm()).item(); assert err < 1e-2, err
                        t = do_bench(f)
                        row.append(f"{label}{['', '+epi', '+pro'][epi]} {t / cub:.2f}x")
                    except Exception as e:
                        row.append(f"{label} epi={epi} FAILED {type(e).__name__}: {str(e)[:80]}")
            print(f"  {BM}x{BN}x{BK} w{nw} s{ns}: " + " | ".join(row))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
