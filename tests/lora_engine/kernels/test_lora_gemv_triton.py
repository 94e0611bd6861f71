"""The fused decode kernel (base GEMV + bias + LoRA in one launch), run on CPU through Triton's interpreter.

The interpreter executes the kernel source with numpy (TRITON_INTERPRET=1, in a subprocess: triton reads it at
import), so CI proves the indexing, masks, both weight layouts, the in-kernel rounding of x, the SPLIT reduction's
fixed order (whichever program arrives last) and the hook in `layers._adapted`. The compiled kernel is checked on
the GPU by benchmarks/tune_gemv.py and by kernels/selfcheck.py (`benchmarks/run_all.py --check`).
"""
import pytest
import torch

from lora_engine.kernels import lora_gemv_triton as lg
from lora_engine.kernels import launch as launch_mod
from lora_engine.kernels.launch import DirectLauncher
from tests.lora_engine.kernels.interpreter import run_interpreted

needs_triton = pytest.mark.skipif(lg.triton is None, reason="triton is not importable")


KERNEL = r'''
import itertools, random, sys
import torch
from triton.runtime import interpreter
from lora_engine.kernels import lora_gemv_triton as lg
assert lg._INTERPRET, "the kernel is not running in triton's interpreter"
layout = sys.argv[1]
DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SMALL = {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}  # several programs and K steps, tails

def case(K, N, R, M, wd, xd, bias, config, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, M, K, generator=g).to(xd)
    W = (torch.randn(K, N, generator=g) / K ** 0.5).to(wd)
    A = (torch.randn(R, K, generator=g) / K ** 0.5).to(wd)
    B = (torch.randn(N, R, generator=g) / R ** 0.5).to(wd)
    b = torch.randn(N, generator=g).to(wd) if bias else None
    Wl = W if layout == "in_out" else W.t().contiguous()
    y = lg.lora_gemv(x, Wl, b, A, B, layout, config=config)
    assert y.shape == (1, M, N) and y.dtype == wd, (y.shape, y.dtype)
    xr = x.to(wd).double()  # the same rounded inputs, float64 products
    lora = (xr @ A.double().t()) @ B.double().t()
    want = xr @ W.double() + lora + (b.double() if bias else 0.0)
    scale = want.abs().max().item()
    err = (y.double() - want).abs().max().item() / scale
    eps = torch.finfo(wd).eps
    assert lora.abs().max().item() > 0.2 * scale, "the LoRA term must matter for this test to mean anything"
    assert err <= eps, f"K={K} N={N} R={R} M={M} {wd} x {xd} bias={bias} {config}: error {err / eps:.2f} eps"
    errs.append(err / eps)
    return y, scale

errs = []
for wd, xd, M, R, bias in itertools.product(["bf16", "fp16"], ["fp32", "bf16"], [1, 3], [8, 12, 32], [True, False]):
    case(70, 45, R, M, DT[wd], DT[xd], bias, SMALL, seed=M * 100 + R)
for seed, (K, N, R, M) in enumerate([(70, 45, 8, 1), (33, 130, 64, 8), (150, 17, 1, 2), (16, 16, 40, 5)]):
    for wd in ("bf16", "fp16"):  # the default tiles (one K step, one or two programs) and odd shapes
        case(K, N, R, M, DT[wd], DT["fp32"], True, None, seed=seed)
case(70, 45, 32, 1, DT["bf16"], DT["fp16"], True, SMALL, seed=7)  # fp16 x onto bf16 weights

# SPLIT 2, 4, 8: the SPLIT programs of a column block each sum a slice of K into their own fp32 slot, the last to
# arrive adds the slots in slot order. Ragged N (45 = 16 + 16 + 13) and K: 150 in slices of 64 leaves SPLIT 4 an
# empty slice (64 + 64 + 22 + 0), 250 does not (64 + 64 + 64 + 58). The same accuracy as SPLIT 1 and within an eps
# of its result (only the order of the fp32 sums and h's rounding per slice differ), the counters zero after it.
def counters_zero():
    return lg._scratch and all(not c.any() for _, c in lg._scratch.values())

splits = [(4, wd, M, R, bias, K) for wd, (M, R), bias, K
          in itertools.product(["bf16", "fp16"], [(1, 8), (3, 32), (8, 12)], [True, False], [150, 250])]
splits += [(s, "bf16", M, 8, bias, 250) for s, M, bias in itertools.product([2, 8], [1, 3], [True, False])]
for split, wd, M, R, bias, K in splits:
    y, scale = case(K, 45, R, M, DT[wd], DT["fp32"], bias, dict(SMALL, SPLIT=split), seed=M * 10 + R + K)
    y1, _ = case(K, 45, R, M, DT[wd], DT["fp32"], bias, SMALL, seed=M * 10 + R + K)
    diff = (y.double() - y1.double()).abs().max().item() / scale
    assert diff <= torch.finfo(DT[wd]).eps, f"SPLIT {split} vs 1, K={K} M={M} {wd}: {diff:.2e} of the largest value"
    assert counters_zero(), f"SPLIT {split}: arrival counters not zeroed after the launch"

# The same bits on a relaunch and whichever program of a column block arrives last: the interpreter runs the
# programs in grid order (the last slot's program last), so here it runs them in shuffled orders too
def shuffled(seed, launch, last):
    """launch() with the programs of the grid run in a random order; last[(seed, x)]: the split that ran last."""
    builder, order = interpreter.interpreter_builder, []
    def set_grid_idx(x, y, z):
        if (x, y, z) == (0, 0, 0):  # the first program of a launch
            order[:] = itertools.product(*map(range, builder.grid_dim))
            random.Random(seed).shuffle(order)
        xs, ys, zs = order.pop()
        last[(seed, xs)] = ys
        type(builder).set_grid_idx(builder, xs, ys, zs)
    builder.set_grid_idx = set_grid_idx
    try:
        return launch()
    finally:
        del builder.set_grid_idx

g = torch.Generator().manual_seed(5)
x, W = torch.randn(3, 250, generator=g), torch.randn(250, 45, generator=g).bfloat16()
A, B = torch.randn(8, 250, generator=g).bfloat16(), torch.randn(45, 8, generator=g).bfloat16()
bias = torch.randn(45, generator=g).bfloat16()
Wl = W if layout == "in_out" else W.t().contiguous()
# a probe whose fp32 sum shows the order: slices 0 and 1 add 2^24 and -2^24, every later slice 1. In slot order
# the ones survive (SPLIT - 2); a 1 added to 2^24 first is lost (2^24 + 1 rounds to 2^24), so any other order of
# the adds gives less. Its rounding to bf16 is exact, unlike the rounding of random data that hides most orders.
Wp = torch.zeros(8 * 32, 45, dtype=torch.bfloat16)
Wp[0], Wp[32], Wp[64::32] = 2.0 ** 24, -2.0 ** 24, 1.0
xp = torch.zeros(1, 8 * 32)
xp[0, ::32] = 1.0
for split in (2, 4, 8):
    cfg = dict(SMALL, SPLIT=split)
    launch = lambda: lg.lora_gemv(x, Wl, bias, A, B, layout, config=cfg)
    ys, last = [launch(), launch()], {}
    for part, _ in lg._scratch.values():  # the slots are not zeroed: a launch reads only what it wrote
        part.fill_(float("nan"))
    ys += [shuffled(seed, launch, last) for seed in range(8)]
    assert all(torch.equal(ys[0], y) for y in ys[1:]), f"SPLIT {split}: the bits depend on the launch"
    assert set(last.values()) == set(range(split)), f"SPLIT {split}: not every slot's program ran last {last}"
    Wk = Wp[:split * 32] if layout == "in_out" else Wp[:split * 32].t().contiguous()
    Ak = torch.zeros(8, split * 32, dtype=torch.bfloat16)  # no LoRA term
    probe = lambda: lg.lora_gemv(xp[:, :split * 32], Wk, None, Ak, B, layout, config=cfg)
    ys = [probe()] + [shuffled(seed, probe, last) for seed in range(8)]
    assert all(torch.equal(y, torch.full_like(y, split - 2)) for y in ys), (split, ys)
    assert counters_zero()

# x is rounded to nearest in the weight dtype before the product: with x = (1 + 0.75 eps, 1) and W(., n) = (1, -1)
# the product is exactly eps (0.75 eps unrounded, 0 truncated)
for wd in (torch.bfloat16, torch.float16):
    eps = torch.finfo(wd).eps
    x = torch.zeros(2, 20)
    x[:, 0], x[:, 1] = 1 + 0.75 * eps, 1.0
    W = torch.zeros(20, 16, dtype=wd)
    W[0], W[1] = 1.0, -1.0
    A, B = torch.zeros(8, 20, dtype=wd), torch.randn(16, 8).to(wd)
    Wl = W if layout == "in_out" else W.t().contiguous()
    y = lg.lora_gemv(x, Wl, None, A, B, layout, config=SMALL)
    assert y.shape == (2, 16) and torch.equal(y, torch.full_like(y, eps)), y

# one row as a 1-D x, and a strided x (copied to rows first): the same numbers as the contiguous rows
W, A, B = torch.randn(40, 24).bfloat16(), torch.randn(8, 40).bfloat16(), torch.randn(24, 8).bfloat16()
Wl = W if layout == "in_out" else W.t().contiguous()
xs = torch.randn(3, 80)[:, ::2]
y = lg.lora_gemv(xs, Wl, None, A, B, layout, config=SMALL)
assert torch.equal(y, lg.lora_gemv(xs.contiguous(), Wl, None, A, B, layout, config=SMALL))
y1 = lg.lora_gemv(xs[1].contiguous(), Wl, None, A, B, layout, config=SMALL)
assert y1.shape == (24,) and torch.equal(y1, y[1])
assert not lg.LAUNCHER.direct and not lg.LAUNCHER.compiled  # the interpreter always takes the JIT path
print(f"worst {max(errs):.2f} eps")
print("ok")
'''


@needs_triton
@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_fused_gemv_matches_float64_reference_in_triton_interpreter(layout):
    run_interpreted(KERNEL, layout)


LAYERS = r'''
import copy
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from lora_engine import LoRASpec, inject_lora, lora_layers, set_blend
from lora_engine.kernels import lora_gemv_triton as lg
from tests.lora_engine.helpers import TOL, randomize_lora, reference_layer, tiny_gpt2
assert lg._INTERPRET

calls = []
fused, applies = lg.lora_gemv, lg.applies
def counting(*args, **kw):
    calls.append((args[5], args[0].dtype))
    return fused(*args, **kw)
lg.lora_gemv = counting

def use_fused(on):  # off: the cached PyTorch path (lora_linear_cached)
    lg.applies = applies if on else (lambda *a: False)

def rel(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()

MIX = {"a0": 0.7, "a1": -0.4, "a2": 1.1, "a3": 0.5}
SITES = ["h.*.attn.c_attn", "h.*.attn.c_proj", "h.*.mlp.c_fc", "h.*.mlp.c_proj"]
for dtype in (torch.bfloat16, torch.float16):
    m = tiny_gpt2(n_layer=2, n_embd=48).to(dtype)
    for i in range(4):  # four blended rank-8 adapters: R = 32 (48 on c_fc, where a3 has rank 16)
        inject_lora(m, LoRASpec(SITES if i < 3 else ["h.*.mlp.c_fc"], rank=8 if i < 3 else 16, alpha=16), f"a{i}")
    randomize_lora(m, std=0.1)
    set_blend(m, MIX)
    m64 = copy.deepcopy(m).double()  # the same rounded weights in float64 (its layers take the PyTorch path)
    set_blend(m64, MIX)
    for tokens in (1, 5, 12):  # 12 rows: more than MAX_ROWS, the PyTorch path
        ids = torch.arange(tokens)[None] % 64
        out = {}
        for on in (True, False):
            use_fused(on)
            calls.clear()
            with torch.no_grad():
                out[on] = m(ids).last_hidden_state
            assert calls == ([("in_out", dtype)] * 8 if on and tokens <= lg.MAX_ROWS else []), (on, tokens, calls)
        with torch.no_grad():
            want = m64(ids).last_hidden_state
        # both paths sit ~1 eps (in norm) from float64 after two blocks, rounding differently on the way
        fused_err, cached_err = rel(out[True], want), rel(out[False], want)
        assert fused_err <= 1.5 * cached_err + 0.1 * TOL[dtype] and rel(out[True], out[False]) < TOL[dtype], \
            (dtype, tokens, fused_err, cached_err)
        assert rel(out[False], want) < TOL[dtype]
    use_fused(True)
    with torch.no_grad():  # the LoRA term is large: without the adapters the output moves far more than that
        set_blend(m, {})
        off = m(ids[:, :3]).last_hidden_state
    assert rel(off, want[:, :3]) > 30 * TOL[dtype]  # (causal: the first 3 of 12 positions are the 3-token output)

# fp32 x under autocast (as LayerNorm hands it over on CUDA) into bf16 nn.Linear and Conv1D: rounded in the kernel
torch.manual_seed(0)
m = nn.Module()
m.lin, m.conv = nn.Linear(70, 45), Conv1D(33, 70)
nn.init.normal_(m.conv.bias, std=0.5)
m.to(torch.bfloat16)
for i in range(3):
    inject_lora(m, LoRASpec(["lin", "conv"], rank=[8, 12, 4][i], alpha=8), f"a{i}")
randomize_lora(m, std=0.2)
mix = {"a0": 1.0, "a1": -0.5, "a2": 2.0}
set_blend(m, mix)
x = torch.randn(1, 3, 70)
for name, layer in lora_layers(m).items():
    out = {}
    for on in (True, False):
        use_fused(on)
        calls.clear()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out[on] = layer(x)
        assert calls == ([(layer.layout, torch.float32)] if on else []), calls
        assert out[on].dtype == torch.bfloat16
    xr, W, b = x.bfloat16().double(), layer.weight.double(), layer.bias.double()
    Ac, Bd = (t.double() for t in layer.inference_factors(torch.bfloat16))  # float64 from the same rounded inputs
    want = xr @ (W.t() if layer.layout == "out_in" else W) + b + (xr @ Ac.t()) @ Bd.t()
    assert rel(out[True], want) < 0.5 * torch.finfo(torch.bfloat16).eps, (name, rel(out[True], want))
    assert rel(out[True], out[False]) < TOL[torch.bfloat16]
    assert rel(want, reference_layer(layer, xr, mix)) < TOL[torch.bfloat16]  # and that is the layer's math
print("ok")
'''


@needs_triton
def test_layers_use_fused_kernel_for_few_rows_and_match_cached_path_in_interpreter():
    """GPT2 (Conv1D layers) in bf16 and fp16: the no-grad forward through the fused kernel equals the cached PyTorch
    path, more than MAX_ROWS rows keep the PyTorch path; bf16 nn.Linear and Conv1D under autocast take fp32 x."""
    run_interpreted(LAYERS)


@needs_triton
def test_applies_only_to_few_rows_of_a_contiguous_16_bit_weight(monkeypatch):
    W, A = torch.zeros(20, 30, dtype=torch.bfloat16), torch.zeros(4, 20, dtype=torch.bfloat16)
    x = torch.zeros(2, 4, 20)
    monkeypatch.setattr(lg, "_INTERPRET", True)  # CPU tensors count as runnable, as under TRITON_INTERPRET=1
    assert lg.applies(x, W, A) and lg.applies(x.bfloat16()[0, :1], W, A)
    assert not lg.applies(torch.zeros(3, 3, 20), W, A)  # 9 rows
    assert not lg.applies(torch.zeros(0, 20), W, A)
    assert not lg.applies(x, W.float(), A.float())  # fp32 weights: cuBLAS
    assert not lg.applies(x, W, A.half())  # compute dtype is not the weight's
    assert not lg.applies(x, W.t(), A)  # a transposed view
    assert not lg.applies(x.to("meta"), W.to("meta"), A.to("meta"))
    monkeypatch.setattr(lg, "_INTERPRET", False)
    assert not lg.applies(x, W, A)  # CPU tensors, compiled triton: the PyTorch path


@needs_triton
def test_wrong_shapes_are_refused_before_launch():
    x = torch.zeros(1, 20)
    W, A, B = (torch.zeros(20, 30, dtype=torch.bfloat16), torch.zeros(4, 20, dtype=torch.bfloat16),
               torch.zeros(30, 4, dtype=torch.bfloat16))
    bad = [(W, None, A, B[:, :3], "in_out"), (W, None, A, B, "out_in"),  # [20, 30] read as [out, in]
           (W, torch.zeros(29, dtype=torch.bfloat16), A, B, "in_out"), (W, None, A, B.half(), "in_out"),
           (W, None, A, B, "row_major")]
    for args in bad:
        with pytest.raises(ValueError, match="expected weight, Ac, Bd, bias shapes"):
            lg.lora_gemv(x, *args)


@needs_triton
def test_unsupported_split_and_too_many_rows_are_refused_before_launch():
    W, A, B = (torch.zeros(20, 30, dtype=torch.bfloat16), torch.zeros(4, 20, dtype=torch.bfloat16),
               torch.zeros(30, 4, dtype=torch.bfloat16))
    for split in (0, 3, 16):
        with pytest.raises(ValueError, match=r"SPLIT .* must be one of \(1, 2, 4, 8\)"):
            lg.lora_gemv(torch.zeros(1, 20), W, None, A, B, "in_out", config={"SPLIT": split})
    with pytest.raises(ValueError, match="at most 8 rows of x, got 9"):
        lg.lora_gemv(torch.zeros(3, 3, 20), W, None, A, B, "in_out")


def test_default_config_runs_enough_programs_for_narrow_outputs():
    for n_in, n_out in ((1280, 3840), (1280, 1280), (1280, 5120), (5120, 1280)):
        cfg = lg.default_config(n_in, n_out, 32)
        assert cfg["BLOCK_N"] >= 16 and (-(-n_out // cfg["BLOCK_N"]) >= 64)


class _FakeCompiled:
    """Stands for triton 3.6's CompiledKernel: records the launcher calls."""
    function, packed_metadata = "function", "packed_metadata"

    def __init__(self, log, fail=False):
        self.log, self.fail = log, fail

    def run(self, *args):
        if self.fail:
            raise TypeError("launcher signature changed")
        self.log.append(("direct", args))


class _FakeJIT:
    """Stands for the JITFunction: `[grid](*args, **kw)` records the call and returns a _FakeCompiled."""

    def __init__(self, log, arg_names, fail=False):
        self.log, self.arg_names, self.fail, self.pre_run_hooks = log, arg_names, fail, []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.log.append(("jit", grid, args, kw))
            return _FakeCompiled(self.log, self.fail)
        return launch


@needs_triton
def test_direct_launch_after_first_jit_launch_with_fallbacks(monkeypatch):
    """The dispatch without a GPU: JIT first, then the launcher with the current stream and every argument in
    signature order; a new specialization, a launch hook or DIRECT_LAUNCH = False take JIT; a failing launcher
    makes that key JIT for good."""
    log = []
    names = lg._lora_gemv_kernel.arg_names
    fake = _FakeJIT(log, names)
    monkeypatch.setattr(lg, "_lora_gemv_kernel", fake)  # per-call tiles: Triton's launch
    monkeypatch.setattr(lg, "LAUNCHER", DirectLauncher(fake, "lora_gemv"))
    monkeypatch.setattr(lg.LAUNCHER, "direct", True)
    monkeypatch.setattr(lg, "_launches", {})
    monkeypatch.setattr(launch_mod, "_current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1000 + device, raising=False)
    W, A, B, bias = (torch.zeros(s, dtype=torch.bfloat16) for s in ((64, 48), (8, 64), (48, 8), (48,)))
    x = torch.zeros(2, 64)
    gemv = lambda x, **kw: lg.lora_gemv(x, W, bias, A, B, "in_out", **kw)

    gemv(x), gemv(x)
    assert [e[0] for e in log] == ["jit", "direct"]
    _, grid, jit_args, kw = log[0]
    _, direct = log[1]
    assert grid[1] == 1 and direct[:9] == (grid[0], 1, 1, 1000, "function", "packed_metadata", None, None, None)
    assert len(direct[9:]) == len(names) and direct[17:21] == jit_args[8:] == (2, 64, 48, 8)
    assert direct[21:] == tuple(kw[n] for n in names[12:]) and kw["BLOCK_M"] == 16  # the constexprs, in order
    assert [a is b for a, b in zip(direct[9:14], (x, W, bias, A, B))] == [True] * 5

    log.clear()
    gemv(x[:1]), gemv(x[:1]), gemv(x, config={"BLOCK_N": 16}), gemv(x)  # M == 1: its own kernel; per-call tiles: JIT
    monkeypatch.setattr(lg, "TUNED", {})
    lg.set_config(64, 48, {"BLOCK_N": 16, "BLOCK_K": 16})  # other constexprs: compiled again
    gemv(x), gemv(x)
    assert [e[0] for e in log] == ["jit", "direct", "jit", "direct", "jit", "direct"]
    assert log[-1][1][-2:] == (16, 16) and log[-1][1][:3] == (3, 1, 1)  # BLOCK_N, BLOCK_K; 48 columns / 16

    log.clear()  # SPLIT 4: 3 x 4 programs; one scratch (slots and counters), the same on every launch
    monkeypatch.setattr(lg, "_scratch", {})
    lg.set_config(64, 48, {"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT": 4})
    gemv(x), gemv(x), gemv(x)
    assert [e[0] for e in log] == ["jit", "direct", "direct"] and log[0][1] == (3, 4)
    part, count = log[0][2][6:8]
    assert part.shape == (4, lg.MAX_ROWS, 48) and part.dtype == torch.float32
    assert count.shape == (3,) and count.dtype == torch.int32 and not count.any()
    assert all(d[1][:3] == (3, 4, 1) and d[1][15] is part and d[1][16] is count for d in log[1:])
    assert list(lg._scratch.values()) == [(part, count)]

    log.clear()
    lg.triton.knobs.runtime.launch_enter_hook.add(print)
    try:
        gemv(x)
    finally:
        lg.triton.knobs.runtime.launch_enter_hook.remove(print)
    monkeypatch.setattr(lg.LAUNCHER, "enabled", False)
    gemv(x)
    monkeypatch.setattr(lg.LAUNCHER, "enabled", True)
    gemv(x)
    assert [e[0] for e in log] == ["jit", "jit", "direct"]

    log.clear()
    fake.fail = True
    lg.LAUNCHER.compiled.clear()
    gemv(x)
    with pytest.warns(UserWarning, match="direct launch failed"):
        gemv(x)  # the launcher raises: JIT launches this call, and every later one
    gemv(x)
    assert [e[0] for e in log] == ["jit", "jit", "jit"] and list(lg.LAUNCHER.compiled.values()) == [None]
