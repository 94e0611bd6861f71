"""Grouped, fused merge / unmerge on CUDA: one launch per group of same-shape layers, one pass over the weights.

merge.py's reference path runs ~15 tensor ops per layer (delta GEMM, fp32 copies, bit arithmetic, a sync per
layer for the overflow list): about 70 bytes of traffic per weight element and hundreds of launches. Here one
pass each way, about 5 bytes per element:
  merge    (read W, write W, c)  W' = rnd(W + delta), back = rnd(W' - delta), c = bits(W) - bits(back) as int8;
                                 the rare |c| > 127 keep W's original in an overflow list (each takes its slot with
                                 an atomic of its own). An element that cannot be merged safely -- W' not finite, or
                                 no overflow slot left -- is not written at all: c = -128 marks it "unchanged".
  unmerge  (read W', c, write W) W <- bits(rnd(W' - delta)) + c (W' itself where c = -128), then the overflow
                                 originals scattered back.
The host reads the counts once after the merge pass: a non-finite element means unmerge (bit-exact, the unwritten
elements untouched) and refuse; a full overflow list (rare) means unmerge and redo with an exact-size list.

delta = sum_a s_a B_a A_a is recomputed in every pass from a snapshot of the factors as R rank-1 fp32 FMA updates
per element in a fixed order (`_delta`): the same operations whatever the tile shape, so `back` is bit-identical
between merge and unmerge, and 8-64 FMAs per element keep the passes memory-bound. (A two-pass merge -- a streaming
pass without counts, then a compaction pass over the corrections -- measured slower in every sweep: NOTES.md (17).)
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

# Tile configuration (benchmarks/tune_merge.py sweeps it on the GPU): the merge pass's tile, and the unmerge pass's
# (U_*). Delta is the same sequence of FMAs per element whatever the tile, so the two may differ (the merge pass
# rounds twice and compares bits, and takes TILES tiles per program). The tiles are small on purpose: at 32
# elements per thread both kernels needed 240-255 registers (ptxas), 8 warps per SM, too few loads in flight to
# stream the weights (NOTES.md (18)). A Group keeps the configuration it was merged with.
CONFIG = {"BLOCK_M": 1, "BLOCK_N": 256, "num_warps": 2, "num_stages": 1,  # best of tune_merge.py on an H200 (v21)
          "maxnreg": None,  # an optional register cap for the merge pass (48 registers with TILES 2: none needed)
          "TILES": 2,  # merge tiles per program (the next one's weights loaded while this one is merged)
          "U_BLOCK_M": 8, "U_BLOCK_N": 128, "U_num_warps": 4}
_TILE_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")  # what the tile kernels take of CONFIG
UNCHANGED = -128  # correction value of an element the merge pass did not write
_BITS = {torch.bfloat16: 16, torch.float16: 16, torch.float32: 32}


def available(weights: list[Tensor], factors: list[Tensor]) -> bool:
    """The fused path applies to contiguous CUDA weights in bf16/fp16/fp32 with fp32 adapter factors (the kernels
    address a weight as row-major [M, N])."""
    return (triton is not None and bool(weights) and all(w.is_cuda and w.dtype in _BITS and w.dim() == 2
                                                         and w.numel() < 2 ** 31 and w.is_contiguous()
                                                         and w.data_ptr() % 16 == 0 for w in weights)
            and all(f.is_cuda and f.dtype == torch.float32 for f in factors))


if triton is not None:
    @triton.jit
    def _delta(F0, P_tab, Q_tab, S_tab, layer, offs_m, offs_n, M, N, NA: tl.constexpr, R: tl.constexpr,
               spm, spr, sqr, sqn, UNROLL: tl.constexpr = False):
        """fp32 tile of sum_a s_a P_a Q_a over rows offs_m and columns offs_n; P_a [M, R], Q_a [R, N] addressed by
        strides from the factor snapshot F0 (`build_group`).

        Rank-1 updates in a fixed order, one fp32 FMA per rank and element (acc from +0.0; per adapter, per rank:
        p = P * s, then acc += p * q): every element's delta is the same sequence of operations whatever the tile
        shape, so merge and unmerge agree bit for bit even on different tiles (and R of 8 to 64 costs 8 to 64 FMAs
        per element: no tensor-core tile, no layout shuffles). A tile loads BM + BN factor values per rank.
        UNROLL: the ranks unrolled, every rank's loads in flight at once (the merge pass; unmerge keeps the loop,
        32 registers instead of 52)."""
        rows, cols = offs_m[:, None], offs_n[None, :]  # P and Q loaded at their own shapes, [BM, 1] and [1, BN]
        row_ok, col_ok = rows < M, cols < N
        acc = tl.zeros((offs_m.shape[0], offs_n.shape[0]), dtype=tl.float32)
        for a in tl.static_range(NA):
            p_ptr = _aligned(F0, tl.load(P_tab + layer * NA + a))  # build_group aligns every factor to 16 bytes:
            q_ptr = _aligned(F0, tl.load(Q_tab + layer * NA + a))  # its rows load as vectors
            s = tl.load(S_tab + layer * NA + a).to(tl.float32)
            if UNROLL:
                for r in tl.static_range(R):
                    acc = _rank_term(acc, p_ptr, q_ptr, s, r, rows, cols, row_ok, col_ok, spm, spr, sqr, sqn)
            else:
                for r in range(R):
                    acc = _rank_term(acc, p_ptr, q_ptr, s, r, rows, cols, row_ok, col_ok, spm, spr, sqr, sqn)
        return acc

    @triton.jit
    def _rank_term(acc, p_ptr, q_ptr, s, r, rows, cols, row_ok, col_ok, spm, spr, sqr, sqn):
        """acc + (P[rows, r] * s) * Q[r, cols]: one fp32 FMA per element."""
        p = tl.load(p_ptr + rows * spm + r * spr, mask=row_ok, other=0.0) * s
        q = tl.load(q_ptr + r * sqr + cols * sqn, mask=col_ok, other=0.0)
        return acc + p * q

    @triton.jit
    def _aligned(base, address):
        """The tensor at `address` (read from a table) as `base` plus a whole number of 16-byte units. Triton proves
        nothing about a pointer it loads, and moved every weight element and factor value with a load or store of
        its own; `base` is a kernel argument (16-byte aligned, specialized at launch), so this pointer is known
        aligned too and tiles move in 16-byte vectors (ptxas: 167 -> 72 registers at 64x64, 4 warps). Every address
        must be 16-byte aligned: `available` checks the weights', build_group places the factors so."""
        per16: tl.constexpr = 128 // base.dtype.element_ty.primitive_bitwidth  # elements in 16 bytes
        return base + (address - base.to(tl.int64)) // 16 * per16

    @triton.jit
    def _bits(x, BITS: tl.constexpr):
        if BITS == 16:
            out = x.to(tl.int16, bitcast=True).to(tl.int32)
        else:
            out = x.to(tl.int32, bitcast=True).to(tl.int64)
        return out

    @triton.jit
    def _merged(w, delta, BITS: tl.constexpr):
        """W' = rnd(W + delta), the correction bits(W) - bits(rnd(W' - delta)) (not yet checked against int8), and
        whether W' is NaN or +-inf (such an element is never written)."""
        new = (w.to(tl.float32) + delta).to(w.dtype)
        back = (new.to(tl.float32) - delta).to(w.dtype)
        newf = new.to(tl.float32)
        return new, _bits(w, BITS) - _bits(back, BITS), (newf - newf) != 0.0

    @triton.jit
    def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr = 1, t: tl.constexpr = 0):
        """The rows, columns, in-bounds mask and flat element offsets of a row-major [M, N] weight of this program's
        tile (of its t-th, when it takes TILES tiles one below the other)."""
        offs_m = (tl.program_id(0) * TILES + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        return offs_m, offs_n, mask, offs_m[:, None] * N + offs_n[None, :]  # int32: build_group checks M * N

    @triton.jit
    def _merge_kernel(W0, W_tab, C0, F0, P_tab, Q_tab, S_tab, counts, ov_layer, ov_index, ov_value, capacity,
                      M, N, spm, spr, sqr, sqn, NA: tl.constexpr, R: tl.constexpr,
                      BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr = 1,
                      INTERPRETER: tl.constexpr = False):
        """counts: [layers] non-finite W' per layer, then [1] the overflow slots asked for (the cursor).

        TILES: tiles per program, one below the other; the weights of the next tile are loaded before this one is
        merged (a thread holds 8 bytes of W per tile; with the per-element slots' 32 registers, two tiles gave
        2.01 -> 1.76 ms: NOTES (21i), (21j))."""
        layer = tl.program_id(2)
        w_ptr = _aligned(W0, tl.load(W_tab + layer))
        offs_m, offs_n, mask, flat = _tile(M, N, BLOCK_M, BLOCK_N, TILES, 0)
        w_next = tl.load(w_ptr + flat, mask=mask, other=0.0)
        for t in tl.static_range(TILES):
            w = w_next
            if t + 1 < TILES:  # the next tile's weights in flight while this one is merged
                next_m, next_n, next_mask, next_flat = _tile(M, N, BLOCK_M, BLOCK_N, TILES, t + 1)
                w_next = tl.load(w_ptr + next_flat, mask=next_mask, other=0.0)
            _merge_tile(w, w_ptr, layer, offs_m, offs_n, mask, flat, C0, F0, P_tab, Q_tab, S_tab, counts, ov_layer,
                        ov_index, ov_value, capacity, M, N, spm, spr, sqr, sqn, NA, R, BITS, INTERPRETER)
            if t + 1 < TILES:
                offs_m, offs_n, mask, flat = next_m, next_n, next_mask, next_flat

    @triton.jit
    def _merge_tile(w, w_ptr, layer, offs_m, offs_n, mask, flat, C0, F0, P_tab, Q_tab, S_tab, counts, ov_layer,
                    ov_index, ov_value, capacity, M, N, spm, spr, sqr, sqn, NA: tl.constexpr, R: tl.constexpr,
                    BITS: tl.constexpr, INTERPRETER: tl.constexpr):
        """Merge one tile whose weights `w` are loaded: W', its corrections, its counts and overflow entries (each
        rare element, a non-finite W' or an overflowing correction, counts itself: `_element_slots`)."""
        delta = _delta(F0, P_tab, Q_tab, S_tab, layer, offs_m, offs_n, M, N, NA, R, spm, spr, sqr, sqn, True)
        new, diff, bad = _merged(w, delta, BITS)
        keep = mask & bad  # NaN or +-inf: leave W as it is
        over = mask & ~keep & ((diff > 127) | (diff < -127))
        keep = _element_slots(counts, layer, keep, over, flat, w, ov_layer, ov_index, ov_value, capacity, INTERPRETER)
        c = tl.where(keep, -128, tl.where(over, 0, diff))  # -128: UNCHANGED
        # an element kept unchanged is written back as it was: the store's mask is then the tile's own, and Triton
        # stores whole 16-byte vectors (masked by `keep` too, every W' was a 2-byte store of its own: NOTES (21))
        tl.store(w_ptr + flat, tl.where(keep, w, new), mask=mask)
        tl.store(C0 + layer.to(tl.int64) * M * N + flat, c.to(tl.int8), mask=mask)

    @triton.jit
    def _element_slots(counts, layer, keep, over, flat, w, ov_layer, ov_index, ov_value, capacity,
                       INTERPRETER: tl.constexpr):
        """Each non-finite element counted and each overflowing one given a slot by an atomic of its own, so the tile
        needs no reduction (with a reduction and a run of slots per tile the merge pass took 2.06 ms, without 1.76 ms
        at two tiles per program: NOTES (21j)). Returns `keep` with the overflows that got no slot added (left
        unchanged).

        The trap: tl.atomic_add through a pointer that is the same for every element, and tl.store at the slots it
        returns, make Triton lay the whole tile out one element per thread and move it there and back through
        shared memory in every tile (ttgir: 6 convert_layouts, 11 barriers); as inline PTX they are elementwise and
        keep the tile's layout. Triton's interpreter runs no PTX: there the same per-element atomics and stores."""
        zero = tl.zeros_like(flat)
        bad_at, cursor = counts + layer + zero, counts + tl.num_programs(2) + zero
        if INTERPRETER:
            tl.atomic_add(bad_at, 1 + zero, mask=keep)
            pos = tl.atomic_add(cursor, 1 + zero, mask=over)
        else:
            _ptx_increment(bad_at, keep)
            pos = _ptx_increment(cursor, over)
        stored = over & (pos < capacity)
        if INTERPRETER:
            tl.store(ov_index + pos, flat, mask=stored)
            tl.store(ov_value + pos, w, mask=stored)
            tl.store(ov_layer + pos, layer + zero, mask=stored)
        else:
            _ptx_put(ov_index + pos, flat, stored)
            _ptx_put(ov_value + pos, w, stored)
            _ptx_put(ov_layer + pos, layer + zero, stored)
        return keep | (over & ~stored)

    @triton.jit
    def _ptx_increment(ptrs, where):
        """Per element where `where`: old = *ptr; *ptr += 1 (one predicated atom; 0 elsewhere)."""
        return tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; mov.u32 $0, 0; @p atom.global.add.u32 $0, [$1], 1; }",
            "=r,l,r", [ptrs, where.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _ptx_put(ptrs, values, where):
        """Per element where `where`: *ptr = value (one predicated store of 16 or 32 bits)."""
        if values.dtype.primitive_bitwidth == 16:
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.b32 p, $2, 0; mov.u32 $0, 0; @p st.global.b16 [$1], $3; }",
                "=r,l,r,h", [ptrs, where.to(tl.int32), values.to(tl.int16, bitcast=True)], dtype=tl.int32,
                is_pure=False, pack=1)
        else:
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.b32 p, $2, 0; mov.u32 $0, 0; @p st.global.b32 [$1], $3; }",
                "=r,l,r,r", [ptrs, where.to(tl.int32), values.to(tl.int32, bitcast=True)], dtype=tl.int32,
                is_pure=False, pack=1)

    @triton.jit
    def _unmerge_kernel(W0, W_tab, O_tab, C0, c_layer0, F0, P_tab, Q_tab, S_tab, M, N, spm, spr, sqr, sqn,
                        NA: tl.constexpr, R: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
        layer = tl.program_id(2)
        offs_m, offs_n, mask, flat = _tile(M, N, BLOCK_M, BLOCK_N)
        w_ptr = _aligned(W0, tl.load(W_tab + layer))
        o_ptr = _aligned(W0, tl.load(O_tab + layer))
        new = tl.load(w_ptr + flat, mask=mask, other=0.0)
        delta = _delta(F0, P_tab, Q_tab, S_tab, layer, offs_m, offs_n, M, N, NA, R, spm, spr, sqr, sqn)
        back = (new.to(tl.float32) - delta).to(new.dtype)
        c = tl.load(C0 + (c_layer0 + layer).to(tl.int64) * M * N + flat, mask=mask, other=0)
        if BITS == 16:
            out = (_bits(back, BITS) + c.to(tl.int32)).to(tl.int16).to(new.dtype, bitcast=True)
        else:
            out = (_bits(back, BITS) + c.to(tl.int64)).to(tl.int32).to(new.dtype, bitcast=True)
        tl.store(o_ptr + flat, tl.where(c == -128, new, out), mask=mask)  # -128: UNCHANGED

    @triton.jit
    def _scatter_kernel(W0, O_tab, ov_layer, ov_index, ov_value, total, BLOCK: tl.constexpr):
        k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = k < total
        layer = tl.load(ov_layer + k, mask=m, other=0)
        o_ptr = tl.load(O_tab + layer, mask=m, other=0).to(W0.dtype)
        tl.store(o_ptr + tl.load(ov_index + k, mask=m, other=0), tl.load(ov_value + k, mask=m), mask=m)

    _INTERPRET = type(_merge_kernel).__name__ == "InterpretedFunction"  # TRITON_INTERPRET=1: no PTX (the CPU tests)
else:
    _INTERPRET = False


@dataclasses.dataclass(eq=False)
class Group:
    """Layers merged together by one launch: same weight shape/dtype/layout and the same adapter ranks.

    Kept between merges (merge.py's FusedPlan): the snapshot, the tables, the launch arguments and the overflow list's
    buffers are reused; only the corrections live from a merge to its unmerge (1 byte per weight element)."""

    weights: list[Tensor]
    factors: Tensor  # flat fp32 snapshot of every A_a and B_a of the group (the delta is recomputed from it)
    tables: dict[str, Tensor]  # device pointer tables: W, P, Q (int64) and S (fp64 scales), one transfer
    shape: tuple[int, int]
    strides: tuple[int, int, int, int]
    ranks: tuple[int, ...]
    config: dict  # the tile configuration merge and unmerge share
    corrections: Tensor | None = None  # int8 [layers, M * N] while merged
    ov_layer: Tensor | None = None  # the overflow list's buffers: at least `capacity` entries, kept between merges
    ov_index: Tensor | None = None
    ov_value: Tensor | None = None
    capacity: int = 0  # overflow slots the last merge pass could fill
    ov_total: int = 0  # entries in the overflow list (set once the merge pass is counted)
    counts: Tensor | None = None  # device [layers + 1] of the last merge pass: non-finite per layer, overflow asked
    launch: tuple | None = None  # `_launch_args`'s last: (config, {"merge"/"unmerge": (grid, constexpr kwargs)})

    def nbytes(self) -> int:
        extra = [self.factors, *self.tables.values()]
        extra += [t for t in (self.corrections, self.ov_layer, self.ov_index, self.ov_value) if t is not None]
        return sum(t.numel() * t.element_size() for t in extra)


def build_group(weights: list[Tensor], layout: str, factors: list[list[tuple[Tensor, Tensor, float]]],
                counts: Tensor | None = None) -> Group:
    """Snapshot the factors (one cat) and build the pointer tables. factors[layer] = [(A_a, B_a, s_a), ...].

    `counts`: where the merge pass counts, a view from `shared_counts` (default: the group's own buffer)."""
    dev, W0 = weights[0].device, weights[0]
    if len({A.shape[0] for per in factors for A, _, _ in per}) != 1:
        raise ValueError("fused merge needs one rank for every adapter of a group (merge.py falls back otherwise)")
    ranks = tuple(A.shape[0] for A, _, _ in factors[0])
    # Snapshot P_a^T [R, M] and Q_a [R, N], row r contiguous in both layouts and every factor 16-byte aligned: a tile
    # loads rank r's factor values for its rows and its columns as vectors (strided by R, from pointers Triton knew
    # nothing of, they were one scalar load per element and rank). Same values, same FMA order: W' does not change.
    M, N = W0.shape
    As = torch.stack([A.detach() for per in factors for A, _, _ in per])  # [K, R, in]
    Bt = torch.stack([B.detach() for per in factors for _, B, _ in per]).transpose(1, 2)  # [K, R, out]
    Ps, Qs = (Bt, As) if layout == "out_in" else (As, Bt)  # out_in: W [out, in] += B A; in_out: W [in, out] += A^T B^T
    R, K = ranks[0], Ps.shape[0]
    p_size, q_size = -(-R * M // 4) * 4, -(-R * N // 4) * 4  # each factor starts on 16 bytes (`_aligned`)
    flat = torch.empty(K * (p_size + q_size), dtype=torch.float32, device=As.device)  # P_k^T [R, M] then Q_k [R, N]
    flat[:K * p_size].view(K, p_size)[:, :R * M].copy_(Ps.reshape(K, R * M))
    flat[K * p_size:].view(K, q_size)[:, :R * N].copy_(Qs.reshape(K, R * N))
    P = [flat.data_ptr() + 4 * k * p_size for k in range(K)]
    Q = [flat.data_ptr() + 4 * (K * p_size + k * q_size) for k in range(K)]
    if M * N >= 2 ** 31:
        raise ValueError(f"fused merge addresses a weight with 32-bit offsets; {M}x{N} is too large "
                         "(merge.py falls back to its PyTorch path)")
    strides = (1, M, N, 1)  # P[m, r] at r * M + m, Q[r, n] at r * N + n
    scales = torch.tensor([s for per in factors for _, _, s in per], dtype=torch.float64).view(torch.int64)
    L, K = len(weights), len(P)
    table = torch.cat([torch.tensor([w.data_ptr() for w in weights] + P + Q, dtype=torch.int64), scales]).to(dev)
    tables = {"W": table[:L], "P": table[L:L + K], "Q": table[L + K:L + 2 * K],
              "S": table[L + 2 * K:].view(torch.float64)}
    return Group(list(weights), flat, tables, (M, N), strides, ranks, dict(CONFIG), counts=counts)


def repoint(g: Group, weights: list[Tensor]) -> None:
    """Address these weights from now on (same device, dtype and shape as the group's; e.g. the merged model moved
    away and back, its weights in new storage)."""
    g.weights = list(weights)
    g.tables["W"].copy_(torch.tensor([w.data_ptr() for w in weights], dtype=torch.int64))


def _launch_args(g: Group, unmerge: bool = False) -> tuple[tuple, dict]:
    """Grid and constexpr kwargs of the group's merge (or unmerge) launches, computed once per tile configuration."""
    if g.launch is None or g.launch[0] != g.config:
        M, N = g.shape
        cfg = g.config
        common = dict(NA=len(g.ranks), R=g.ranks[0], BITS=_BITS[g.weights[0].dtype])
        tiles = {}
        for name, prefix in (("merge", ""), ("unmerge", "U_")):
            kw = dict(common, **{k: cfg.get(prefix + k, cfg[k]) for k in _TILE_KEYS})
            if cfg.get(prefix + "maxnreg"):  # a register cap (more warps per SM; the rare branch may spill)
                kw["maxnreg"] = cfg[prefix + "maxnreg"]
            rows = kw["BLOCK_M"]
            if name == "merge":
                kw["INTERPRETER"] = _INTERPRET
            if name == "merge" and cfg.get("TILES", 1) > 1:
                kw["TILES"] = cfg["TILES"]
                rows *= kw["TILES"]
            tiles[name] = ((triton.cdiv(M, rows), triton.cdiv(N, kw["BLOCK_N"]), len(g.weights)), kw)
        g.launch = (dict(cfg), tiles)
    return g.launch[1]["unmerge" if unmerge else "merge"]


def default_capacity(g: Group) -> int:
    """Overflow slots to reserve before the counts are known: typically a few per 10,000 elements overflow."""
    return max(1024, len(g.weights) * g.shape[0] * g.shape[1] // 1024)


def shared_counts(layers_per_group: list[int], device: torch.device) -> tuple[Tensor, list[Tensor]]:
    """One device buffer for the counts of several groups, and each group's view of it (for `build_group`):
    `finish(groups, buffer)` then reads them all with one transfer, no concatenation launched per merge."""
    sizes = [n + 1 for n in layers_per_group]
    counts = torch.zeros(sum(sizes), dtype=torch.int32, device=device)
    return counts, list(counts.split(sizes))


def launch_merge(g: Group, capacity: int | None = None, counts_zeroed: bool = False) -> None:
    """Write W' and the corrections in one launch (no host sync); `g.counts` holds what `finish` reads.

    `capacity`: overflow slots to use; the buffers grow to it and are kept. Default: `default_capacity`, or all the
    slots the buffers already have (a list that once ran short does not run short again for the same adapters).
    `counts_zeroed`: the caller zeroed `g.counts` (one launch for the shared buffer of every group)."""
    dev, (M, N) = g.weights[0].device, g.shape
    if capacity is None:
        g.capacity = max(default_capacity(g), 0 if g.ov_layer is None else g.ov_layer.numel())
    else:
        g.capacity = max(1, capacity)
    if g.ov_layer is None or g.ov_layer.numel() < g.capacity:
        g.ov_layer = torch.empty(g.capacity, dtype=torch.int32, device=dev)
        g.ov_index = torch.empty(g.capacity, dtype=torch.int32, device=dev)
        g.ov_value = torch.empty(g.capacity, dtype=g.weights[0].dtype, device=dev)
    if g.counts is None:
        g.counts = torch.zeros(len(g.weights) + 1, dtype=torch.int32, device=dev)
    elif not counts_zeroed:
        g.counts.zero_()  # the merge pass only adds to its counts
    g.corrections = torch.empty(len(g.weights), M * N, dtype=torch.int8, device=dev)
    grid, kw = _launch_args(g)
    t = g.tables
    _merge_kernel[grid](g.weights[0], t["W"], g.corrections, g.factors, t["P"], t["Q"], t["S"], g.counts,
                        g.ov_layer, g.ov_index, g.ov_value, g.capacity, M, N, *g.strides, **kw)


def finish(groups: list[Group], counts: Tensor | None = None) -> list[tuple[list[int], int]]:
    """One host sync for all groups: per group (non-finite count per layer, overflow slots asked for).

    `counts`: the buffer from `shared_counts` the groups count in, in order; without it their counts are gathered.
    Sets each group's `ov_total` to the entries actually stored (all of them unless the list was full)."""
    values = (counts if counts is not None else torch.cat([g.counts for g in groups])).tolist()
    out, row = [], 0
    for g in groups:
        L = len(g.weights)
        asked = values[row + L]
        g.ov_total = min(asked, g.capacity)
        out.append((values[row:row + L], asked))
        row += L + 1
    return out


def restore(g: Group, out: list[Tensor] | None = None, only: int | None = None) -> None:
    """Unmerge: write the original bits into the weights (or into `out`, leaving the weights as they are).

    `only`: restore just that layer of the group (into out[0]), e.g. to fingerprint a merged model's base.
    A full restore into the weights frees the corrections (the overflow buffers are kept for the next merge).
    """
    t, O = (g.tables, g.tables["W"]) if out is None and only is None else _partial_tables(g, out, only)
    grid, kw = _launch_args(g, unmerge=True)
    if only is not None:
        grid = (grid[0], grid[1], 1)
    _unmerge_kernel[grid](g.weights[0], t["W"], O, g.corrections, only or 0, g.factors, t["P"], t["Q"], t["S"],
                          *g.shape, *g.strides, **kw)
    if g.ov_total:
        _scatter_overflow(g, O, only)
    if out is None and only is None:
        g.corrections = None
        g.ov_total = 0


def _partial_tables(g: Group, out: list[Tensor] | None, only: int | None) -> tuple[dict[str, Tensor], Tensor]:
    """Tables and O table of a restore of one layer (`only`) and/or into other tensors (`out`)."""
    t = dict(g.tables)
    if only is not None:
        na = len(g.ranks)
        t["W"] = t["W"][only:only + 1]
        t["P"], t["Q"], t["S"] = (t[k][only * na:(only + 1) * na] for k in ("P", "Q", "S"))
    if out is not None and any(o.data_ptr() % 16 or not o.is_contiguous() for o in out):
        raise ValueError("restore(out=...) needs contiguous, 16-byte aligned buffers (torch.empty_like gives them)")
    O = (torch.tensor([o.data_ptr() for o in out], dtype=torch.int64).to(g.weights[0].device)
         if out is not None else t["W"])
    return t, O


def _scatter_overflow(g: Group, O_tab: Tensor, only: int | None) -> None:
    """Write the overflow list's originals back (those of layer `only` alone, renumbered 0, when it is given)."""
    total = g.ov_total
    layer, index, value = g.ov_layer, g.ov_index, g.ov_value  # the kernel reads the first `total` entries
    if only is not None:
        keep = layer[:total] == only
        layer, index, value = torch.zeros_like(layer[:total][keep]), index[:total][keep], value[:total][keep]
        total = layer.numel()
    if total:
        _scatter_kernel[(triton.cdiv(total, 1024),)](g.weights[0], O_tab, layer, index, value, total, BLOCK=1024)
