"""Fused LoRA training GEMMs (CUDA, Triton): the LoRA terms ride in the base GEMMs' epilogues.

An eager training step at IndexTTS2's GPT shape is bound by the host: every cuBLAS call costs tens of microseconds
of CPU, and the PyTorch path (functional._KeptLoRAFn) makes seven per layer where the frozen base makes two
(benchmarks/NOTES.md (13), (23)); its skinny LoRA GEMMs also pass over every output and input gradient once more.
Here a layer takes four launches, and the rank-R products add no pass over an output or an input gradient:

    forward    h  = xr Ac^T                                      rows pass over x (xr stored when x is fp32:
                                                                 the cast autocast would make anyway)
               y  = xr W^T + b + s h Bc^T                        the base GEMM, the LoRA term in its epilogue
    backward   u  = dy Bc,  dB = s dy^T h                        rows pass over dy, beside dB's programs
               dx = dy W + s u Ac,  dA = s u^T xr                the base GEMM, written in x's own dtype, beside
                                                                 dA's programs (fp32, as dB)

Two passes share a launch when neither needs the other's result (the programs of a grid run in no set order): the
launch, not the GPU work, is what the host pays for (~20 us each on the H100's host, NOTES.md (29)).
xr is x rounded to the compute dtype as autocast rounds it; h, u are rounded to it (as the cuBLAS path stores
them). Products accumulate in fp32; y and dx are rounded once. W(k, n) is read through strides, so the kept cast
base ([out, in]) and a 16-bit base stored as nn.Linear ([out, in]) or transformers Conv1D ([in, out]) all work.
On Hopper the two GEMMs read a and W (and write a 16-bit output) through TMA tensor descriptors (_operands).
The GEMMs' main loops hold the base product alone: with h accumulated beside it (a second tl.dot per step) they
ran 2-5x slower than cuBLAS (NOTES.md (26)). dA and dB: each program owns a block of dA's
columns or dB's rows and sums all M rows in a fixed order (the same bits on every run, which exact resume needs).

Used by `layers._adapted` for the usual training case when `applies` says so (`LoRALayer.fused_training`);
`benchmarks/tune_train.py` sweeps the tiles on the GPU, kernels/selfcheck.py checks them there, and the CPU tests
run them in Triton's interpreter.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .launch import DirectLauncher, Tiled, cdiv, interpreting, tma_aligned, tma_supported

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheel has no triton: layers use the PyTorch path
    triton = None

if triton is not None:
    from .exact_ops import dot as _dot, round_to as _round

MAX_RANK = 64  # R padded to <= 64 keeps the h / u accumulators and the factor tiles small beside the base tile
MIN_ROWS = 64  # below this many rows the GEMMs are not what a step spends its time on: the PyTorch path
_DTYPES = (torch.bfloat16, torch.float16)


def _gemm_tiles(block_m: int, block_n: int, block_k: int, warps: int, stages: int) -> dict:
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8, "num_warps": warps,
            "num_stages": stages}


# (in, out) -> tiles per pass: the fastest of benchmarks/tune_train.py on an H100 (rows, grads:
# h100-2026-12-05-tune_train-v25; fwd, dx through TMA: the sweep of h100-2026-12-07-v31.json's "train_tiles")
TUNED: dict[tuple[int, int], dict[str, dict]] = {
    (1280, 3840): {"rows": {"BLOCK_M": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3},
                   "fwd": _gemm_tiles(128, 128, 64, 4, 3), "dx": _gemm_tiles(128, 128, 64, 4, 4),
                   "grads": {"BLOCK_F": 32, "BLOCK_M": 256, "num_warps": 4, "num_stages": 3}},
    (1280, 1280): {"rows": {"BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3},
                   "fwd": _gemm_tiles(128, 128, 64, 8, 3), "dx": _gemm_tiles(128, 128, 64, 8, 3),
                   "grads": {"BLOCK_F": 32, "BLOCK_M": 256, "num_warps": 4, "num_stages": 3}},
    (1280, 5120): {"rows": {"BLOCK_M": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3},
                   "fwd": _gemm_tiles(128, 128, 64, 4, 3), "dx": _gemm_tiles(128, 128, 64, 4, 4),
                   "grads": {"BLOCK_F": 32, "BLOCK_M": 256, "num_warps": 4, "num_stages": 3}},
    (5120, 1280): {"rows": {"BLOCK_M": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3},
                   "fwd": _gemm_tiles(128, 128, 64, 4, 4), "dx": _gemm_tiles(128, 256, 64, 8, 3),
                   "grads": {"BLOCK_F": 32, "BLOCK_M": 256, "num_warps": 4, "num_stages": 3}}}
DEFAULTS = {"rows": {"BLOCK_M": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3},  # other shapes
            "fwd": _gemm_tiles(128, 128, 64, 8, 3), "dx": _gemm_tiles(128, 128, 64, 8, 3),
            "grads": {"BLOCK_F": 32, "BLOCK_M": 128, "num_warps": 4, "num_stages": 3}}


if triton is not None:
    @triton.jit
    def _grouped(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """(row block, column block) of program `pid`, GROUP_M row blocks at a time so that they share the weight
        tiles in L2."""
        num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = GROUP_M * num_n
        first = (pid // group) * GROUP_M
        size = tl.minimum(num_m - first, GROUP_M)
        return first + (pid % group) % size, (pid % group) // size

    @triton.jit
    def _rows_block(p_ptr, q_ptr, out_ptr, pr_ptr, pid, M, K, R, sqr, sqk, STORE_PR: tl.constexpr,
                    R_PAD: tl.constexpr, INTERPRETER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """out [M, R] = round(pr Q^T) for row block `pid` (BLOCK_M rows), pr = P [M, K] rounded to the compute dtype
        (Q's), Q(r, k) at q_ptr + r sqr + k sqk: h = xr Ac^T (Q = Ac) and u = dy Bc (Q(r, n) = Bc[n, r]). STORE_PR:
        pr stored too (P arrives in fp32: the cast autocast would make, in the same pass)."""
        cdt = q_ptr.dtype.element_ty
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_r = tl.arange(0, R_PAD)
        m_ok, r_ok = offs_m < M, offs_r < R
        acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            ok = m_ok[:, None] & (offs_k < K)[None, :]
            pr = _round(tl.load(p_ptr + offs_m[:, None] * K + offs_k[None, :], mask=ok, other=0.0), cdt, INTERPRETER)
            if STORE_PR:
                tl.store(pr_ptr + offs_m[:, None] * K + offs_k[None, :], pr, mask=ok)
            qt = tl.load(q_ptr + offs_r[None, :] * sqr + offs_k[:, None] * sqk,
                         mask=(offs_k < K)[:, None] & r_ok[None, :], other=0.0)  # Q^T tile [BLOCK_K, R_PAD]
            acc = _dot(pr, qt, acc, INTERPRETER)
        tl.store(out_ptr + offs_m[:, None] * R + offs_r[None, :], _round(acc, cdt, INTERPRETER),
                 mask=m_ok[:, None] & r_ok[None, :])

    @triton.jit
    def _rows_kernel(p_ptr, q_ptr, out_ptr, pr_ptr, M, K, R, sqr, sqk, STORE_PR: tl.constexpr, R_PAD: tl.constexpr,
                     INTERPRETER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """_rows_block, one program per BLOCK_M rows."""
        _rows_block(p_ptr, q_ptr, out_ptr, pr_ptr, tl.program_id(0), M, K, R, sqr, sqk, STORE_PR, R_PAD, INTERPRETER,
                    BLOCK_M, BLOCK_K)

    @triton.jit
    def _gemm_tile(a_ptr, w_ptr, p_ptr, q_ptr, bias_ptr, out_ptr, pid, s, M, N, K, R, swk, swn, sqr, sqn,
                   HAS_BIAS: tl.constexpr, TMA: tl.constexpr, W_KN: tl.constexpr, OUT_TMA: tl.constexpr,
                   R_PAD: tl.constexpr, INTERPRETER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """out [M, N] = a W + s p Q (+ bias) for tile `pid` ([BLOCK_M, BLOCK_N]), rounded once to out's dtype: a [M, K]
        row-major in the compute dtype, W(k, n) at w_ptr + k swk + n swn, p [M, R] row-major, Q(r, n) at
        q_ptr + r sqr + n sqn. The main loop is the base GEMM alone (one tl.dot: a second one in the loop stalls the
        MMA pipeline, NOTES.md (26)); the rank-R term and the bias are added in the epilogue.
        TMA: a and W are tensor descriptors instead (blocks [BLOCK_M, BLOCK_K] of a; of W [BLOCK_K, BLOCK_N] of
        W(k, n) when W_KN, else [BLOCK_N, BLOCK_K] of W(n, k)), loaded by the TMA unit; swk, swn unused. OUT_TMA:
        out is a descriptor too ([BLOCK_M, BLOCK_N]), stored by it. Pointer loads took 1.45-2.07x cuBLAS's time
        for the same GEMM, TMA 1.09-1.32x (benchmarks/probe_gemm.py, NOTES.md (30)).
        Forward: a = xr, W = the base's W^T, p = h, Q = Bc^T. Backward: a = dy, W = the base's W, p = u, Q = Ac."""
        pid_m, pid_n = _grouped(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, R_PAD)
        m_ok, n_ok, r_ok = offs_m < M, offs_n < N, offs_r < R
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if TMA:  # out of bounds (the tails) the unit reads zeros
                a = a_ptr.load([pid_m * BLOCK_M, k0])
                if W_KN:
                    w = w_ptr.load([k0, pid_n * BLOCK_N])
                else:
                    w = w_ptr.load([pid_n * BLOCK_N, k0]).T  # [BLOCK_K, BLOCK_N]
            else:
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < K
                a = tl.load(a_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                            other=0.0)
                w = tl.load(w_ptr + offs_k[:, None] * swk + offs_n[None, :] * swn,
                            mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
            acc = _dot(a, w, acc, INTERPRETER)
        p = tl.load(p_ptr + offs_m[:, None] * R + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        q = tl.load(q_ptr + offs_r[:, None] * sqr + offs_n[None, :] * sqn, mask=r_ok[:, None] & n_ok[None, :],
                    other=0.0)  # [R_PAD, BLOCK_N]
        # into the base accumulator itself, (acc / s + p Q) s: s p Q in a [BLOCK_M, BLOCK_N] fp32 tile of its own
        # doubled the registers the epilogue holds and spilled every large tile (NOTES.md (27)); s != 0 (_gemm)
        acc = _dot(p, q, acc * (1.0 / s), INTERPRETER) * s
        if HAS_BIAS:  # rounded to the compute dtype (p's) as autocast casts it
            b = _round(tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0), p_ptr.dtype.element_ty, INTERPRETER)
            acc += b.to(tl.float32)[None, :]
        if OUT_TMA:  # out of bounds the unit writes nothing
            out_ptr.store([pid_m * BLOCK_M, pid_n * BLOCK_N], _round(acc, out_ptr.dtype, INTERPRETER))
        else:
            tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :],
                     _round(acc, out_ptr.dtype.element_ty, INTERPRETER), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _gemm_kernel(a_ptr, w_ptr, p_ptr, q_ptr, bias_ptr, out_ptr, s, M, N, K, R, swk, swn, sqr, sqn,
                     HAS_BIAS: tl.constexpr, TMA: tl.constexpr, W_KN: tl.constexpr, OUT_TMA: tl.constexpr,
                     R_PAD: tl.constexpr, INTERPRETER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """_gemm_tile, one program per tile."""
        _gemm_tile(a_ptr, w_ptr, p_ptr, q_ptr, bias_ptr, out_ptr, tl.program_id(0), s, M, N, K, R, swk, swn, sqr, sqn,
                   HAS_BIAS, TMA, W_KN, OUT_TMA, R_PAD, INTERPRETER, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)

    @triton.jit
    def _sum_rows(p_ptr, q_ptr, out_ptr, s, M, F, R, f0, sf, sr, R_PAD: tl.constexpr, INTERPRETER: tl.constexpr,
                  BLOCK_F: tl.constexpr, BLOCK_M: tl.constexpr):
        """out(f, r) = s sum_m P[m, f] Q[m, r] for BLOCK_F columns f of P [M, F] from f0, Q [M, R], all rows in order;
        out(f, r) at out_ptr + f sf + r sr, fp32."""
        offs_f = f0 + tl.arange(0, BLOCK_F)
        offs_r = tl.arange(0, R_PAD)
        f_ok, r_ok = offs_f < F, offs_r < R
        acc = tl.zeros((BLOCK_F, R_PAD), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < M
            pt = tl.load(p_ptr + offs_m[None, :] * F + offs_f[:, None], mask=f_ok[:, None] & m_ok[None, :],
                         other=0.0)  # P^T tile [BLOCK_F, BLOCK_M]
            q = tl.load(q_ptr + offs_m[:, None] * R + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :],
                        other=0.0)  # Q tile [BLOCK_M, R_PAD]
            acc = _dot(pt, q, acc, INTERPRETER)
        tl.store(out_ptr + offs_f[:, None] * sf + offs_r[None, :] * sr, acc * s, mask=f_ok[:, None] & r_ok[None, :])

    @triton.jit
    def _grads_kernel(x_ptr, u_ptr, dy_ptr, h_ptr, da_ptr, db_ptr, s, M, N, K, R,
                      R_PAD: tl.constexpr, INTERPRETER: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_M: tl.constexpr):
        """dA [R, K] = s u^T xr and dB [N, R] = s dy^T h in fp32: the first cdiv(K, BLOCK_F) programs own BLOCK_F
        columns of dA each, the rest BLOCK_F rows of dB."""
        pid = tl.program_id(0)
        n_a = tl.cdiv(K, BLOCK_F)
        if pid < n_a:  # dA^T block: P = xr [M, K], Q = u
            _sum_rows(x_ptr, u_ptr, da_ptr, s, M, K, R, pid * BLOCK_F, 1, K, R_PAD, INTERPRETER, BLOCK_F, BLOCK_M)
        else:  # dB block: P = dy [M, N], Q = h
            _sum_rows(dy_ptr, h_ptr, db_ptr, s, M, N, R, (pid - n_a) * BLOCK_F, R, 1, R_PAD, INTERPRETER, BLOCK_F,
                      BLOCK_M)

    @triton.jit
    def _u_db_kernel(dy_ptr, bc_ptr, u_ptr, h_ptr, db_ptr, s, M, N, R, R_PAD: tl.constexpr,
                     INTERPRETER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr,
                     BLOCK_MS: tl.constexpr):
        """The backward's first launch, two independent parts: dB [N, R] = s dy^T h (the first cdiv(N, BLOCK_F)
        programs, which sum all M rows and so start first) and u [M, R] = round(dy Bc) (the rest, BLOCK_M rows
        each)."""
        pid = tl.program_id(0)
        n_b = tl.cdiv(N, BLOCK_F)
        if pid < n_b:
            _sum_rows(dy_ptr, h_ptr, db_ptr, s, M, N, R, pid * BLOCK_F, R, 1, R_PAD, INTERPRETER, BLOCK_F, BLOCK_MS)
        else:  # Q(r, n) = Bc[n, r]
            _rows_block(dy_ptr, bc_ptr, u_ptr, dy_ptr, pid - n_b, M, N, R, 1, R, False, R_PAD, INTERPRETER, BLOCK_M,
                        BLOCK_K)

    @triton.jit
    def _dx_da_kernel(dy_ptr, w_ptr, u_ptr, ac_ptr, dx_ptr, xr_ptr, da_ptr, s, M, N, K, R, swk, swn, N_A,
                      TMA: tl.constexpr, W_KN: tl.constexpr, OUT_TMA: tl.constexpr, R_PAD: tl.constexpr,
                      INTERPRETER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_MS: tl.constexpr):
        """The backward's second launch, after u: dA [R, K] = s u^T xr (the first N_A programs, BLOCK_F columns
        each; N_A = 0: none) and dx [M, K] = dy W + s u Ac (the rest, one _gemm_tile each; W(k, n) at
        w_ptr + k swk + n swn read as the GEMM's [N, K] operand; TMA, W_KN, OUT_TMA: as _gemm_tile takes them).
        s != 0 (lora_backward)."""
        pid = tl.program_id(0)
        if pid < N_A:
            _sum_rows(xr_ptr, u_ptr, da_ptr, s, M, K, R, pid * BLOCK_F, 1, K, R_PAD, INTERPRETER, BLOCK_F, BLOCK_MS)
        else:
            _gemm_tile(dy_ptr, w_ptr, u_ptr, ac_ptr, u_ptr, dx_ptr, pid - N_A, s, M, K, N, R, swn, swk, K, 1, False,
                       TMA, W_KN, OUT_TMA, R_PAD, INTERPRETER, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)

    _INTERPRET = interpreting(_gemm_kernel)
    _LAUNCH = {"rows": DirectLauncher(_rows_kernel, "lora_train rows"),
               "gemm": DirectLauncher(_gemm_kernel, "lora_train gemm"),
               "grads": DirectLauncher(_grads_kernel, "lora_train grads"),
               "u_db": DirectLauncher(_u_db_kernel, "lora_train u + dB"),
               "dx_da": DirectLauncher(_dx_da_kernel, "lora_train dx + dA")}
else:
    _INTERPRET, _LAUNCH = False, {}

_configs: dict[tuple, dict] = {}  # (in, out, R, pass) -> the kw of its launches (one object per key: DirectLauncher)


def set_config(in_dim: int, out_dim: int, which: str, config: dict | None) -> None:
    """Use these tiles for pass `which` ("rows", "fwd", "dx", "grads") of every [in -> out] layer; None: the
    default. For "dx" BLOCK_N is dx's output columns and BLOCK_K the step over the layer's outputs."""
    if which not in DEFAULTS:
        raise ValueError(f"lora_train_triton: the passes are {sorted(DEFAULTS)}, got {which!r}")
    tiles = TUNED.setdefault((in_dim, out_dim), {})
    if config is None:
        tiles.pop(which, None)
    else:
        tiles[which] = dict(config)
    _configs.clear()


# the backward's launches, each two passes in one grid: the first pass's tiles and launch options, and the grads
# pass's BLOCK_F and BLOCK_M (as BLOCK_MS) for its factor-gradient programs
MERGED = {"u_db": "rows", "dx_da": "dx"}
MERGED_BACKWARD = True  # False: lora_backward takes the three separate launches
TMA = True  # False: the GEMMs load through pointers (benchmarks compare: --no-tma); tiles that failed: _TMA_FAILED


def _tiles(in_dim: int, out_dim: int, which: str) -> dict:
    return {**DEFAULTS[which], **TUNED.get((in_dim, out_dim), {}).get(which, {})}


def _kw(in_dim: int, out_dim: int, rank: int, which: str) -> dict:
    key = (in_dim, out_dim, rank, which)
    kw = _configs.get(key)
    if kw is None:
        if which in MERGED:
            grads = _tiles(in_dim, out_dim, "grads")
            tiles = {**_tiles(in_dim, out_dim, MERGED[which]), "BLOCK_F": grads["BLOCK_F"], "BLOCK_MS": grads["BLOCK_M"]}
        else:
            tiles = _tiles(in_dim, out_dim, which)
        kw = _configs[key] = dict(R_PAD=max(16, triton.next_power_of_2(rank)), INTERPRETER=_INTERPRET, **tiles)
    return kw


def applies(x: Tensor, W: Tensor, Ac: Tensor) -> bool:
    """Whether the fused kernels take this training forward: triton; x, W and Ac on the current CUDA device (CPU
    tensors under TRITON_INTERPRET=1); at least MIN_ROWS rows; a bf16/fp16 W with one unit stride in the compute
    dtype (Ac's); rank <= MAX_RANK; x in a float dtype; not while torch.compile traces."""
    if triton is None or torch.compiler.is_compiling():
        return False
    if x.is_cuda:
        if not (W.is_cuda and Ac.is_cuda and x.get_device() == W.get_device() == Ac.get_device()
                == torch.cuda.current_device()):
            return False
    elif not (_INTERPRET and x.device.type == W.device.type == Ac.device.type == "cpu"):
        return False
    return (x.dim() >= 2 and x.numel() >= MIN_ROWS * x.shape[-1] and x.dtype in (torch.float32, *_DTYPES)
            and W.dtype in _DTYPES and Ac.dtype == W.dtype and W.dim() == 2 and 1 in W.stride()
            and Ac.shape[0] <= MAX_RANK)


def _strides(W: Tensor, layout: str) -> tuple[int, int]:
    """(stride of k, stride of n) for W(k, n) = the base weight's [in, out] element: "out_in" W [out, in]."""
    return (W.stride(1), W.stride(0)) if layout == "out_in" else (W.stride(0), W.stride(1))


def _rows(P: Tensor, Q: Tensor, sqr: int, sqk: int, R: int, which: tuple) -> tuple[Tensor, Tensor]:
    """(round(Pr Q^T) [M, R], Pr): Pr is P itself when it is already in Q's dtype, else P rounded (stored)."""
    M, K = P.shape
    cdt = Q.dtype
    out = torch.empty(M, R, dtype=cdt, device=P.device)
    store = P.dtype != cdt
    pr = torch.empty(M, K, dtype=cdt, device=P.device) if store else P
    kw = _kw(*which, R, "rows")
    _LAUNCH["rows"]((cdiv(M, kw["BLOCK_M"]),), (P, Q, out, pr, M, K, R, sqr, sqk, store), kw, (K, R, store))
    return out, pr


def _operands(a: Tensor, W: Tensor, swk: int, swn: int, out: Tensor, kw: dict, tma: bool) -> tuple:
    """(a, W, out, TMA, W_KN, OUT_TMA) as _gemm_tile takes them for out [M, N] = a [M, K] W(k, n): with `tma`, a and
    W as tensor descriptors in the tiles of `kw` where TMA may read them (16-byte aligned rows, a unit stride in
    W(k, n) along k or n; Hopper or later), out too when it is 16-bit (an fp32 tile staged for the TMA store would
    take the shared memory the main loop's stages need); else the tensors themselves (pointer loads)."""
    M, K = a.shape
    N = out.shape[1]
    w_kn = swn == 1  # W(k, n) rows along k: the [K, N] matrix itself; else W(n, k) is [N, K] row-major
    w_strides = (swk, 1) if w_kn else (swn, 1)
    if not (tma and tma_supported(a) and 1 in (swk, swn) and tma_aligned(a, (K, 1)) and tma_aligned(W, w_strides)):
        return a, W, out, False, False, False
    bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    w = Tiled(W, (K, N), w_strides, (bk, bn)) if w_kn else Tiled(W, (N, K), w_strides, (bn, bk))
    out_tma = out.element_size() == 2 and tma_aligned(out, (N, 1))
    o = Tiled(out, (M, N), (N, 1), (bm, bn)) if out_tma else out
    return Tiled(a, (M, K), (K, 1), (bm, bk)), w, o, True, w_kn, out_tma


_TMA_FAILED: dict[int, dict] = {}  # id(kw) -> kw (held, so that the id is not reused) of tiles whose TMA launch failed


def _tma_or_pointers(launch, kw: dict) -> None:
    """launch(tma) with tma = TMA, unless the TMA launch at these tiles (`kw`) failed before. A TMA launch that
    raises (a triton or GPU that cannot compile it, e.g. out of shared memory at these tiles) turns TMA off for
    these tiles for good, with a warning, and launches again through pointers, which rewrites every output; an
    error of the launch itself then comes from there."""
    if TMA and id(kw) not in _TMA_FAILED:
        try:
            return launch(True)
        except Exception as err:
            _TMA_FAILED[id(kw)] = kw
            warnings.warn(f"lora_train: a TMA launch failed ({err!r}); these tiles load through pointers from now on")
    launch(False)


def _gemm(a: Tensor, W: Tensor, swk: int, swn: int, p: Tensor, Q: Tensor, sqr: int, sqn: int, bias: Tensor | None,
          s: float, N: int, out_dtype: torch.dtype, which: tuple, pass_: str) -> Tensor:
    """a W + s p Q (+ bias) as [M, N] in `out_dtype` (_gemm_kernel), with the tiles of layer `which` = (in, out) for
    pass `pass_` ("fwd" or "dx")."""
    M, K = a.shape
    out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    kw = _kw(*which, p.shape[1], pass_)
    grid = (cdiv(M, kw["BLOCK_M"]) * cdiv(N, kw["BLOCK_N"]),)
    R = p.shape[1]
    if s == 0.0:  # no rank-R term; the kernel divides by s: unit scale and every p, Q element masked off instead
        s, R = 1.0, 0

    def launch(tma: bool) -> None:
        a_, w_, out_, *flags = _operands(a, W, swk, swn, out, kw, tma)
        args = (a_, w_, p, Q, W if bias is None else bias, out_, float(s), M, N, K, R, swk, swn, sqr, sqn,
                bias is not None, *flags)  # HAS_BIAS, TMA, W_KN, OUT_TMA by position: part of the launch key
        _LAUNCH["gemm"](grid, args, kw, (pass_, K, N, bias is not None))

    _tma_or_pointers(launch, kw)
    return out


def lora_forward(x2: Tensor, W: Tensor, bias: Tensor | None, Ac: Tensor, Bc: Tensor, s: float, layout: str
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(y [M, out], h [M, R], xr [M, in]) for 2-D contiguous x2; W in `layout`, Ac [R, in], Bc [out, R], bias [>= out]
    in W's dtype. xr is x2 itself when it is already in W's dtype. Two launches: h (and xr), then y."""
    M, K = x2.shape
    N, R = Bc.shape
    want = (N, K) if layout == "out_in" else (K, N)
    if tuple(W.shape) != want or tuple(Ac.shape) != (R, K) or (bias is not None and bias.shape[0] < N):
        raise ValueError(f"lora_train forward: x has {K} features, expected W {want} ({layout}), Ac {(R, K)}, bias of "
                         f">= {N}; found W {tuple(W.shape)}, Ac {tuple(Ac.shape)}, bias "
                         f"{None if bias is None else tuple(bias.shape)}: pass the layer's kept casts (train_casts.py)")
    swk, swn = _strides(W, layout)
    h, xr = _rows(x2, Ac, K, 1, R, (K, N))
    y = _gemm(xr, W, swk, swn, h, Bc, 1, R, bias, s, N, W.dtype, (K, N), "fwd")  # Q = Bc^T: Q(r, n) = Bc[n, r]
    return y, h, xr


def lora_dx(dy2: Tensor, W: Tensor, Ac: Tensor, Bc: Tensor, s: float, layout: str, dx_dtype: torch.dtype | None
            ) -> tuple[Tensor | None, Tensor]:
    """(dx [M, in] in `dx_dtype`, u [M, R] in W's dtype) for dy2 [M, out] contiguous in W's dtype; dx_dtype None:
    u alone. Two launches: u, then dx."""
    M, N = dy2.shape
    R, K = Ac.shape
    u, _ = _rows(dy2, Bc, 1, R, R, (K, N))  # Q(r, n) = Bc[n, r]
    if dx_dtype is None:
        return None, u
    swk, swn = _strides(W, layout)  # dx = dy W: W(n, k) read as the GEMM's [N, K] operand, i.e. W(k, n) swapped
    return _gemm(dy2, W, swn, swk, u, Ac, K, 1, None, s, K, dx_dtype, (K, N), "dx"), u


def lora_factor_grads(xr: Tensor, u: Tensor, dy2: Tensor, h: Tensor, s: float) -> tuple[Tensor, Tensor]:
    """(dA [R, in], dB [out, R]) in fp32: s u^T xr and s dy2^T h, each summed over all rows in a fixed order."""
    M, K = xr.shape
    N, R = dy2.shape[1], u.shape[1]
    dA = torch.empty(R, K, dtype=torch.float32, device=xr.device)
    dB = torch.empty(N, R, dtype=torch.float32, device=xr.device)
    kw = _kw(K, N, R, "grads")
    grid = (cdiv(K, kw["BLOCK_F"]) + cdiv(N, kw["BLOCK_F"]),)
    _LAUNCH["grads"](grid, (xr, u, dy2, h, dA, dB, float(s), M, N, K, R), kw, (K, N, R))
    return dA, dB


def lora_backward(dy2: Tensor, xr: Tensor, h: Tensor, W: Tensor, Ac: Tensor, Bc: Tensor, s: float, layout: str,
                  dx_dtype: torch.dtype | None) -> tuple[Tensor | None, Tensor, Tensor]:
    """(dx [M, in] in `dx_dtype` or None, dA [R, in], dB [out, R] in fp32): what lora_dx and lora_factor_grads give,
    in two launches instead of three (each launch costs the host ~20 us, NOTES.md (29)): u and dB together, then dx
    and dA together. dx_dtype None: no dx (dA's programs alone in the second launch). s == 0: the three launches
    (the GEMM folds its term in as (acc / s + p Q) s); so too after the merged launches failed once
    (MERGED_BACKWARD)."""
    global MERGED_BACKWARD
    if MERGED_BACKWARD and s != 0.0:
        try:
            return _merged_backward(dy2, xr, h, W, Ac, Bc, s, layout, dx_dtype)
        except Exception as err:  # a triton that cannot compile the two-pass grids: every result is rewritten below
            MERGED_BACKWARD = False
            warnings.warn(f"lora_train: the merged backward launches failed ({err!r}); the three separate launches "
                          f"from now on")
    dx, u = lora_dx(dy2, W, Ac, Bc, s, layout, dx_dtype)
    return (dx, *lora_factor_grads(xr, u, dy2, h, s))


def _merged_backward(dy2: Tensor, xr: Tensor, h: Tensor, W: Tensor, Ac: Tensor, Bc: Tensor, s: float, layout: str,
                     dx_dtype: torch.dtype | None) -> tuple[Tensor | None, Tensor, Tensor]:
    M, N = dy2.shape
    R, K = Ac.shape
    u = torch.empty(M, R, dtype=Ac.dtype, device=dy2.device)
    dA = torch.empty(R, K, dtype=torch.float32, device=dy2.device)
    dB = torch.empty(N, R, dtype=torch.float32, device=dy2.device)
    kw = _kw(K, N, R, "u_db")
    grid = (cdiv(N, kw["BLOCK_F"]) + cdiv(M, kw["BLOCK_M"]),)
    _LAUNCH["u_db"](grid, (dy2, Bc, u, h, dB, float(s), M, N, R), kw, (N, R))
    kw = _kw(K, N, R, "dx_da")
    n_a = cdiv(K, kw["BLOCK_F"])
    dx = None if dx_dtype is None else torch.empty(M, K, dtype=dx_dtype, device=dy2.device)
    n_dx = 0 if dx is None else cdiv(M, kw["BLOCK_M"]) * cdiv(K, kw["BLOCK_N"])
    swk, swn = _strides(W, layout)

    def launch(tma: bool) -> None:  # dx = dy W: W(n, k) as the GEMM's operand, i.e. W(k, n) swapped (lora_dx)
        ops = (dy2, W, u, False, False, False) if dx is None else _operands(dy2, W, swn, swk, dx, kw, tma)
        dy_, w_, dx_, *flags = ops
        args = (dy_, w_, u, Ac, dx_, xr, dA, float(s), M, N, K, R, swk, swn, n_a, *flags)
        _LAUNCH["dx_da"]((n_a + n_dx,), args, kw, (K, N))

    _tma_or_pointers(launch, kw)
    return dx, dA, dB


class FusedLoRAFn(torch.autograd.Function):
    """One adapter at one uniform scale `s` on a frozen 16-bit base (kept cast by train_casts.py, or stored so):
    the four launches above per layer and step. `ops` = (W, bias, Ac, Bc, layout): the tensors the kernels read,
    fixed between this forward and its backward (the optimizer steps after the backward; they are held on ctx, not
    saved, as _KeptLoRAFn's views are)."""

    @staticmethod
    def forward(ctx, x, A, B, ops, s):
        W, bias, Ac, Bc, layout = ops
        x2 = x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y, h, xr = lora_forward(x2, W, bias, Ac, Bc, s, layout)
        ctx.save_for_backward(xr, h)
        ctx.ops, ctx.s, ctx.x_shape, ctx.x_dtype = ops, s, x.shape, x.dtype
        ctx.grad_dtypes = (A.dtype, B.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        xr, h = ctx.saved_tensors
        W, _, Ac, Bc, layout = ctx.ops
        s, need = ctx.s, ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])
        if dy2.dtype != W.dtype or not dy2.is_contiguous():
            dy2 = dy2.to(W.dtype, memory_format=torch.contiguous_format)
        dx_dtype = ctx.x_dtype if need[0] else None  # the first layer's input (the embeddings' LayerNorm): no dx
        if not (need[1] or need[2]):
            dx, _ = lora_dx(dy2, W, Ac, Bc, s, layout, dx_dtype)
            return None if dx is None else dx.view(ctx.x_shape), None, None, None, None
        dx, dA, dB = lora_backward(dy2, xr, h, W, Ac, Bc, s, layout, dx_dtype)
        dA = dA.to(ctx.grad_dtypes[0]) if need[1] else None  # fp32 masters: no copy
        dB = dB.to(ctx.grad_dtypes[1]) if need[2] else None
        return None if dx is None else dx.view(ctx.x_shape), dA, dB, None, None


def fused_lora_linear(x: Tensor, A: Tensor, B: Tensor, ops: tuple, s: float) -> Tensor:
    """Training forward of one adapter (A, B) at scale `s` through the fused kernels: see FusedLoRAFn."""
    return FusedLoRAFn.apply(x, A, B, ops, s)
