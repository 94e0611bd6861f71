"""One-launch LoRA forward for decode: base GEMV + bias + LoRA in a single Triton kernel (no grad, few rows).

For a few rows of x (M <= 8 after flattening: one-token decode) every LoRA layer is launch-bound. PyTorch's cached
inference path (`functional.lora_linear_cached`) runs four kernels per layer (cast x, base addmm, h = x Ac^T,
y += h Bd^T); the base alone runs two. This kernel does all of it in one launch:

    xr      = x rounded to the weight dtype (bf16/fp16), as autocast would (x may arrive fp32: LayerNorm output)
    h[m, r] = sum_k xr[m, k] Ac[r, k]                                      Ac [R, in]
    y[m, n] = sum_k xr[m, k] W(k, n) + bias[n] + sum_r h[m, r] Bd[n, r]    Bd [out, R], the blend d folded in

with W(k, n) = W[k, n] for "in_out" (transformers Conv1D, [in, out]) and W[n, k] for "out_in" (nn.Linear).
Products accumulate in fp32; h is rounded to the weight dtype before its product with Bd (as the cuBLAS path
stores it); y is written in the weight dtype, which is the compute dtype (what the PyTorch path returns).

Grid: SPLIT programs per BLOCK_N output columns, each looping over its slice of K in BLOCK_K steps (SPLIT > 1 fills
the GPU when few column blocks meet a long input: the partial sums meet in an fp32 scratch and are added in a fixed
order, so the result has the same bits on every launch). Every program recomputes h for its rows and slice (Ac is
R x in: it stays in L2), which is what lets one launch do everything. Each program computes its block transposed
(y^T = W^T xr^T + Bd h^T) so that the output columns are the MMA's long side, split across warps, and the rows of
x its short side, padded to 16; R is padded to a power of two >= 16 (tl.dot's minimum); masks cover any in/out/R.
Used by `layers._adapted` for no-grad eager forwards when `applies` says so; `benchmarks/tune_gemv.py` times it and
sweeps the tile configuration on the GPU.

In Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) the constexpr INTERPRETER switches in exact workarounds
(exact_ops.py). After the first launch for a shape and specialization, the compiled kernel is launched directly
(launch.py, `LAUNCHER.enabled`): Triton's own launch path costs more host time than the kernel takes on the GPU.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .launch import DirectLauncher, interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheel has no triton: layers use the PyTorch path
    triton = None

MAX_ROWS = 8  # rows of x (after flattening) this kernel takes; beyond that the GEMMs are no longer launch-bound
MAX_RANK = 256  # the h accumulator [R, 16] and the Ac tiles stay in registers / shared memory up to this
SPLITS = (1, 2, 4, 8)  # programs per column block, each summing a slice of the input (`SPLIT` in the tiles)
_DTYPES = (torch.bfloat16, torch.float16)
# (in, out) -> tiles with the least graphed time in benchmarks/tune_gemv.py on an H200 (ranks 8 and 32 summed)
TUNED: dict[tuple[int, int], dict] = {
    (1280, 3840): {"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT": 1, "num_warps": 4, "num_stages": 4},
    (1280, 1280): {"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT": 2, "num_warps": 4, "num_stages": 4},
    (1280, 5120): {"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT": 2, "num_warps": 4, "num_stages": 4},
    (5120, 1280): {"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT": 8, "num_warps": 4, "num_stages": 4}}
_launches: dict[tuple, tuple] = {}  # shapes, dtypes, layout -> (grid, constexpr kwargs): checked and built once


def set_config(in_dim: int, out_dim: int, config: dict | None) -> None:
    """Use these tiles (BLOCK_N, BLOCK_K, num_warps, num_stages) for every [in -> out] layer; None: the default."""
    if config is None:
        TUNED.pop((in_dim, out_dim), None)
    else:
        TUNED[(in_dim, out_dim)] = dict(config)
    _launches.clear()


def default_config(in_dim: int, out_dim: int, rank: int) -> dict:
    """Tiles for a weight of this shape without a TUNED entry (a guess until tune_gemv.py has run on the GPU).

    BLOCK_N: the widest column block that still gives >= 100 programs (an H200 has 132 SMs; the 1280-wide outputs
    get 16 columns, 80 programs). BLOCK_K: an 8 KB weight tile per pipeline stage, shorter for a large rank (the
    Ac tile [R, BLOCK_K] shares the stage's shared memory) and no longer than `in` needs.
    """
    block_n = 128
    while block_n > 16 and -(-out_dim // block_n) < 100:
        block_n //= 2
    r_pad = max(16, 1 << (rank - 1).bit_length())
    block_k = min(max(64, 4096 // block_n), 8192 // r_pad, max(16, 1 << (in_dim - 1).bit_length()))
    # SPLIT 2: a long `in` and too few column blocks to fill the GPU -> two programs per block, each half of `in`
    split = 2 if -(-out_dim // block_n) < 100 and in_dim >= 2048 else 1
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT": split, "num_warps": 4, "num_stages": 4}


if triton is not None:
    from .exact_ops import dot as _dot, round_to as _round

    @triton.jit
    def _lora_gemv_kernel(x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, part_ptr, count_ptr, M, K, N, R,
                          W_IN_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr,
                          INTERPRETER: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """y[:M, cols]^T for one block of output columns; x [M, K], Ac [R, K], Bd [N, R], y [M, N] row-major.

        Computed transposed, y^T = W^T xr^T + Bd h^T: the block of output columns is the MMA's long side, split
        across warps, and the few rows of x its short side (padded to BLOCK_M = 16), so no warp holds a copy of the
        weight tile.

        SPLIT > 1: program (n, s) covers the s-th of SPLIT slices of K, LoRA included (h's slices go through Bd
        separately: the product is linear in h), and stores its fp32 partial sum in slot s of `part` (read as
        [SPLIT, M, N]).
        Then it counts itself in `count[n]`; the last of the SPLIT to arrive adds the slots in slot order
        (0, 1, ..., SPLIT - 1: the same bits whichever program is last), writes y and zeroes `count[n]` for the
        next launch (also a CUDA graph replay). The slots need no zeroing: each is written before it is read."""
        cdt = w_ptr.dtype.element_ty  # the compute dtype: the weight's
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        if SPLIT == 1:
            k_lo, k_hi = 0, K
        else:
            chunk = tl.cdiv(tl.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K
            k_lo = tl.program_id(1) * chunk
            k_hi = tl.minimum(K, k_lo + chunk)
        offs_r = tl.arange(0, R_PAD)
        row_ok, col_ok, r_ok = offs_m < M, offs_n < N, offs_r < R
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # (xr W)^T
        h = tl.zeros((R_PAD, BLOCK_M), dtype=tl.float32)  # (xr Ac^T)^T
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < k_hi
            x = tl.load(x_ptr + offs_m[None, :] * K + offs_k[:, None], mask=k_ok[:, None] & row_ok[None, :],
                        other=0.0)
            x = _round(x, cdt, INTERPRETER)  # xr^T [BLOCK_K, BLOCK_M] in the compute dtype, as autocast rounds it
            if W_IN_OUT:  # W [K, N]: each row of W^T strided, columns of the tile contiguous
                w_offs = offs_n[:, None] + offs_k[None, :] * N
            else:  # W [N, K]: W^T's tile rows contiguous
                w_offs = offs_n[:, None] * K + offs_k[None, :]
            w = tl.load(w_ptr + w_offs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # W^T tile [BLOCK_N, BLOCK_K]
            a = tl.load(a_ptr + offs_r[:, None] * K + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :],
                        other=0.0)  # Ac tile [R_PAD, BLOCK_K]
            acc = _dot(w, x, acc, INTERPRETER)
            h = _dot(a, x, h, INTERPRETER)
        bd = tl.load(b_ptr + offs_n[:, None] * R + offs_r[None, :], mask=col_ok[:, None] & r_ok[None, :],
                     other=0.0)  # Bd tile [BLOCK_N, R_PAD]
        acc = _dot(bd, _round(h, cdt, INTERPRETER), acc, INTERPRETER)  # h rounded, as the cuBLAS path stores it
        out_ok = col_ok[:, None] & row_ok[None, :]
        if SPLIT == 1:
            _finish(acc, bias_ptr, y_ptr, offs_m, offs_n, col_ok, out_ok, N, cdt, HAS_BIAS, INTERPRETER)
        else:
            tile = part_ptr + offs_m[None, :] * N + offs_n[:, None]  # slot 0 of the scratch, read as [SPLIT, M, N]
            tl.store(tile + tl.program_id(1) * M * N, acc, mask=out_ok)  # this program's slot: plain stores
            tl.debug_barrier()  # every thread's store is issued before the block arrives (the release covers them)
            arrived = tl.atomic_add(count_ptr + tl.program_id(0), 1, sem="acq_rel", scope="gpu")  # by one thread
            if arrived == SPLIT - 1:  # the last of this column block: every slot is written and visible to it
                total = tl.load(tile, mask=out_ok, other=0.0, cache_modifier=".cg")  # .cg: from L2, not a stale L1
                for s in tl.static_range(1, SPLIT):  # slot order, whichever program arrived last
                    total += tl.load(tile + s * M * N, mask=out_ok, other=0.0, cache_modifier=".cg")
                _finish(total, bias_ptr, y_ptr, offs_m, offs_n, col_ok, out_ok, N, cdt, HAS_BIAS, INTERPRETER)
                tl.store(count_ptr + tl.program_id(0), 0)  # zero for the next launch (a CUDA graph replay too)

    @triton.jit
    def _finish(acc, bias_ptr, y_ptr, offs_m, offs_n, col_ok, out_ok, N, cdt: tl.constexpr, HAS_BIAS: tl.constexpr,
                INTERPRETER: tl.constexpr):
        """y^T block = acc (+ bias), rounded once to the compute dtype."""
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + offs_m[None, :] * N + offs_n[:, None], _round(acc, cdt, INTERPRETER), mask=out_ok)

    _INTERPRET = interpreting(_lora_gemv_kernel)  # TRITON_INTERPRET=1: CPU tensors run
    LAUNCHER = DirectLauncher(_lora_gemv_kernel, "lora_gemv")
else:
    _INTERPRET, LAUNCHER = False, None


def applies(x: Tensor, weight: Tensor, Ac: Tensor) -> bool:
    """Whether `lora_gemv` takes this forward: triton; x, weight and Ac on the current CUDA device (Triton launches
    there; CPU tensors under TRITON_INTERPRET=1); at most MAX_ROWS rows; a contiguous bf16/fp16 weight in the
    compute dtype (Ac's); not while torch.compile traces."""
    if triton is None:
        return False
    if x.is_cuda:
        if not (weight.is_cuda and Ac.is_cuda
                and x.get_device() == weight.get_device() == Ac.get_device() == torch.cuda.current_device()):
            return False
    elif not (_INTERPRET and x.device.type == weight.device.type == Ac.device.type == "cpu"):
        return False
    k = x.shape[-1] if x.dim() else 0
    return (0 < x.numel() <= MAX_ROWS * k and weight.dtype in _DTYPES and Ac.dtype == weight.dtype
            and Ac.shape[0] <= MAX_RANK and weight.is_contiguous() and not torch.compiler.is_compiling())


def _launch(key: tuple, config: dict | None) -> tuple:
    hit = _launches.get(key) if config is None else None
    if hit is not None:
        return hit
    K, w_shape, a_shape, b_shape, bias_shape, b_dtype, w_dtype, layout = key
    N = w_shape[1] if layout == "in_out" else w_shape[0]
    R = a_shape[0]
    want = ((K, N) if layout == "in_out" else (N, K), (R, K), (N, R), (N,) if bias_shape is not None else None)
    if layout not in ("in_out", "out_in") or (tuple(w_shape), tuple(a_shape), tuple(b_shape), bias_shape) != want \
            or b_dtype != w_dtype:
        raise ValueError(f"lora_gemv: for x with {K} features and an {layout!r} weight, expected weight, Ac, Bd, "
                         f"bias shapes {want} (Bd in the weight's dtype), found {tuple(w_shape)}, {tuple(a_shape)}, "
                         f"{tuple(b_shape)}, {bias_shape} (Bd {b_dtype}, weight {w_dtype}): pass the factors "
                         f"LoRALayer.inference_factors returns")
    cfg = {**default_config(K, N, R), **TUNED.get((K, N), {}), **(config or {})}
    if cfg["BLOCK_N"] < 16 or cfg["BLOCK_K"] < 16:
        raise ValueError(f"lora_gemv tiles: BLOCK_N and BLOCK_K must be >= 16 (tl.dot's minimum), got {cfg}")
    cfg.setdefault("SPLIT", 1)
    if cfg["SPLIT"] not in SPLITS:
        raise ValueError(f"lora_gemv tiles: SPLIT (programs per column block, each a slice of the input) must be "
                         f"one of {SPLITS}, got {cfg}")
    hit = (N, (triton.cdiv(N, cfg["BLOCK_N"]), cfg["SPLIT"]),
           dict(W_IN_OUT=layout == "in_out", HAS_BIAS=bias_shape is not None,
                R_PAD=max(16, triton.next_power_of_2(R)), INTERPRETER=_INTERPRET, BLOCK_M=16, **cfg))
    if config is None:
        _launches[key] = hit
    return hit


_scratch: dict[tuple, tuple[Tensor, Tensor]] = {}  # device, stream, out, grid -> (fp32 partial sums, counters)


def _partials(y: Tensor, grid: tuple) -> tuple[Tensor, Tensor]:
    """The fp32 partial-sum slots [SPLIT, MAX_ROWS, out] and the zeroed arrival counters [column blocks] of a SPLIT
    launch. Each launch writes every slot element it reads and leaves the counters zeroed again, so the pair is
    allocated once and stays valid across CUDA graph capture and replays (first made during a capture, the
    counters' zero fill is part of that graph: one small kernel per replay). One pair per stream: launches on one
    stream run one after another, so they never share the pair at the same time."""
    dev = y.device
    stream = torch._C._cuda_getCurrentRawStream(dev.index) if dev.type == "cuda" else 0
    key = (dev, stream, y.shape[-1], grid)
    hit = _scratch.get(key)
    if hit is None:
        hit = _scratch[key] = (torch.empty(grid[1], MAX_ROWS, y.shape[-1], dtype=torch.float32, device=dev),
                               torch.zeros(grid[0], dtype=torch.int32, device=dev))
    return hit


def lora_gemv(x: Tensor, weight: Tensor, bias: Tensor | None, Ac: Tensor, Bd: Tensor, layout: str,
              config: dict | None = None) -> Tensor:
    """y = xr W (+ bias) + (xr Ac^T) Bd^T in one launch, shaped x.shape[:-1] + (out,), in weight.dtype.

    `weight` in `layout` ("in_out" [in, out] or "out_in" [out, in]); Ac [R, in], Bd [out, R] already in weight's
    dtype with d folded into Bd (`LoRALayer.inference_factors`). Call only where `applies(x, weight, Ac)`.
    `config`: BLOCK_N, BLOCK_K, SPLIT, num_warps, num_stages for this call only, over TUNED and `default_config`.
    """
    K = x.shape[-1]
    M = x.numel() // K
    if M > MAX_ROWS:  # the kernel covers 16 rows, the scratch MAX_ROWS: more would be dropped or overrun
        raise ValueError(f"lora_gemv takes at most {MAX_ROWS} rows of x, got {M} (x {tuple(x.shape)}): check "
                         f"`applies` first and use the PyTorch path for more")
    key = (K, weight.shape, Ac.shape, Bd.shape, None if bias is None else tuple(bias.shape), Bd.dtype, weight.dtype,
           layout)
    N, grid, kw = _launch(key, config)
    if not x.is_contiguous():  # rare (x is [.., 1, in] in decode): rows are addressed as m * K + k
        x = x.contiguous()
    if not (Ac.is_contiguous() and Bd.is_contiguous()):
        Ac, Bd = Ac.contiguous(), Bd.contiguous()
    y = torch.empty((*x.shape[:-1], N), dtype=weight.dtype, device=x.device)
    part, count = _partials(y, grid) if grid[1] > 1 else (y, y)
    args = (x, weight, weight if bias is None else bias, Ac, Bd, y, part, count, M, K, N, Ac.shape[0])
    if config is not None:  # tiles for this call only: Triton's own launch
        _lora_gemv_kernel[grid](*args, **kw)
    else:
        LAUNCHER(grid, args, kw, key)
    return y
