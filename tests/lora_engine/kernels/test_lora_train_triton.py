"""The fused LoRA training kernels (rows pass, GEMM with the LoRA epilogue, factor gradients), run on CPU through
Triton's interpreter.

The interpreter executes the kernel source with numpy (TRITON_INTERPRET=1, in a subprocess: triton reads it at
import), so CI proves the indexing, masks and tails, both weight layouts, the in-kernel rounding of fp32 x, every
rank up to MAX_RANK, the autograd Function and the hook in `layers._adapted`, each against float64. The compiled
kernels are checked on the GPU by kernels/selfcheck.py (`benchmarks/run_all.py --check`) and benchmarks/tune_train.py.
"""
import pytest
import torch

from lora_engine.kernels import lora_train_triton as lt
from tests.lora_engine.kernels.interpreter import run_interpreted

needs_triton = pytest.mark.skipif(lt.triton is None, reason="triton is not importable")


SMALL = r'''
from lora_engine.kernels import lora_train_triton as lt
assert lt._INTERPRET, "the kernels are not running in triton's interpreter"
GEMM = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 1}
lt.DEFAULTS.update(rows={"BLOCK_M": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}, fwd=dict(GEMM),
                   dx=dict(GEMM), grads={"BLOCK_F": 16, "BLOCK_M": 32, "num_warps": 4, "num_stages": 1})
lt._configs.clear()  # several programs in every direction, several steps of every loop, ragged tails
'''

KERNELS = SMALL + r'''
import itertools, sys
import torch
layout = sys.argv[1]
DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

def check(name, got, want, dtype, lora=None):
    """max |got - want| <= eps of the largest |want| (one rounding of the output, fp32 sums), and the LoRA term is a
    large part of it (else a missing term would pass)."""
    scale = want.abs().max().item()
    err = (got.double() - want).abs().max().item() / scale
    assert torch.isfinite(got).all(), name
    assert err <= torch.finfo(dtype).eps, f"{name}: error {err / torch.finfo(dtype).eps:.2f} eps ({case})"
    if lora is not None:
        assert lora.abs().max().item() > 0.2 * scale, f"{name}: the LoRA term is too small to test anything"
    errs.append(err / torch.finfo(dtype).eps)

errs = []
shapes = [(100, 70, 45), (64, 33, 130), (77, 150, 17), (130, 16, 16)]  # (M, in, out): tails in M, K and N
for (M, K, N), R, wd, xd, bias in itertools.product(shapes, [1, 8, 12, 64], ["bf16", "fp16"], ["fp32", "bf16"],
                                                      [True, False]):
    if R == 64 and (M, K, N) != shapes[0]:
        continue
    case = (M, K, N, R, wd, xd, bias, layout)
    wd, xd = DT[wd], DT[xd]
    g = torch.Generator().manual_seed(M + K + N + R)
    x = torch.randn(M, K, generator=g).to(xd if xd != torch.bfloat16 else wd)  # bf16 x: the weight's own dtype
    W = (torch.randn(N, K, generator=g) / K ** 0.5).to(wd)
    Wl = W if layout == "out_in" else W.t().contiguous()
    Ac = (torch.randn(R, K, generator=g) / K ** 0.5).to(wd)
    Bc = (torch.randn(N, R, generator=g) / R ** 0.5).to(wd)
    b = torch.randn(N, generator=g) if bias else None  # fp32 bias: rounded in the kernel, as autocast does
    s = 1.5
    y, h, xr = lt.lora_forward(x, Wl, b, Ac, Bc, s, layout)
    assert y.dtype == h.dtype == xr.dtype == wd and y.shape == (M, N) and h.shape == (M, R) and xr.shape == (M, K)
    assert torch.equal(xr, x.to(wd)), "xr is not x rounded to nearest in the weight dtype"
    assert (xr.data_ptr() == x.data_ptr()) == (x.dtype == wd), "xr must be x itself when no cast is needed"
    x64 = xr.double()
    h64 = x64 @ Ac.double().t()
    check("h", h, h64, wd)
    lora = s * h.double() @ Bc.double().t()  # from the kernel's own rounded h: the remaining error is y's rounding
    want = x64 @ W.double().t() + lora + (b.to(wd).double() if bias else 0.0)
    check("y", y, want, wd, lora)
    dy = torch.randn(M, N, generator=g).to(wd)
    for dx_dtype in (torch.float32, wd):
        dx, u = lt.lora_dx(dy, Wl, Ac, Bc, s, layout, dx_dtype)
        assert dx.dtype == dx_dtype and dx.shape == (M, K) and u.shape == (M, R) and u.dtype == wd
        check("u", u, dy.double() @ Bc.double(), wd)
        lora = s * u.double() @ Ac.double()
        check(f"dx {dx_dtype}", dx, dy.double() @ W.double() + lora, dx_dtype if dx_dtype != torch.float32 else wd,
              lora)
    none, u_alone = lt.lora_dx(dy, Wl, Ac, Bc, s, layout, None)
    assert none is None and torch.equal(u_alone, u)
    dA, dB = lt.lora_factor_grads(xr, u, dy, h, s)
    assert dA.dtype == dB.dtype == torch.float32 and dA.shape == (R, K) and dB.shape == (N, R)
    check("dA", dA, s * u.double().t() @ x64, torch.bfloat16)  # fp32 sums of M products: well inside bf16's eps
    check("dB", dB, s * dy.double().t() @ h.double(), torch.bfloat16)
    for dx_dtype in (torch.float32, None):  # the two merged launches: the same sums as the three launches apart
        got = lt.lora_backward(dy, xr, h, Wl, Ac, Bc, s, layout, dx_dtype)
        want3 = (lt.lora_dx(dy, Wl, Ac, Bc, s, layout, dx_dtype)[0], dA, dB)
        assert (got[0] is None) == (dx_dtype is None), case
        assert all(g is w or torch.equal(g, w) for g, w in zip(got, want3)), f"lora_backward differs ({case})"
    if R == 8:  # s = 0: the GEMM kernel folds its term in as (acc / s + p Q) s, so _gemm passes none instead
        y0, _, _ = lt.lora_forward(x, Wl, b, Ac, Bc, 0.0, layout)
        check("y at s = 0", y0, x64 @ W.double().t() + (b.to(wd).double() if bias else 0.0), wd)
        dx0, _ = lt.lora_dx(dy, Wl, Ac, Bc, 0.0, layout, torch.float32)
        check("dx at s = 0", dx0, dy.double() @ W.double(), wd)
        dx0b, dA0, dB0 = lt.lora_backward(dy, xr, h, Wl, Ac, Bc, 0.0, layout, torch.float32)
        assert torch.equal(dx0b, dx0) and not dA0.any() and not dB0.any() and dA0.shape == dA.shape
print(f"worst {max(errs):.2f} eps over {len(errs)} outputs")
print("ok")
'''


@needs_triton
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_fused_training_kernels_match_float64_in_triton_interpreter(layout):
    run_interpreted(KERNELS, layout)


TMA_PATH = SMALL + r'''
import itertools
import torch
from lora_engine.kernels import launch
# the TMA path (tensor descriptors for a, W and a 16-bit out) against the pointer path, bit for bit: the same fp32
# sums in the same order, so any wrong tile origin, block or transposition shows; ragged M, K and N tails (the
# unit reads zeros and writes nothing out of bounds), both layouts, both dx dtypes, the merged backward
used = []
launcher = lt._LAUNCH["gemm"].__call__.__func__
def spying(self, grid, args, kw, key):  # how many descriptors each GEMM launch takes
    if self.name in ("lora_train gemm", "lora_train dx + dA"):
        used.append(sum(type(a) is launch.Tiled for a in args))
    return launcher(self, grid, args, kw, key)
launch.DirectLauncher.__call__ = spying
for (M, K, N), layout, xd in itertools.product([(100, 48, 40), (77, 64, 24), (130, 16, 72)], ["out_in", "in_out"],
                                               [torch.float32, torch.bfloat16]):
    case = (M, K, N, layout, xd)
    g = torch.Generator().manual_seed(M + K + N)
    x = torch.randn(M, K, generator=g).to(xd)
    W = (torch.randn(N, K, generator=g) / K ** 0.5).bfloat16()
    Wl = W if layout == "out_in" else W.t().contiguous()
    Ac = (torch.randn(8, K, generator=g) / K ** 0.5).bfloat16()
    Bc = (torch.randn(N, 8, generator=g) / 8 ** 0.5).bfloat16()
    b, dy = torch.randn(N, generator=g), torch.randn(M, N, generator=g).bfloat16()
    out = {}
    for tma in (True, False):
        lt.TMA = tma
        used.clear()
        y, h, xr = lt.lora_forward(x, Wl, b, Ac, Bc, 1.5, layout)
        dx16, _ = lt.lora_dx(dy, Wl, Ac, Bc, 1.5, layout, torch.bfloat16)
        dx32, dA, dB = lt.lora_backward(dy, xr, h, Wl, Ac, Bc, 1.5, layout, torch.float32)
        out[tma] = (y, dx16, dx32, dA, dB)
        assert used == ([3, 3, 2] if tma else [0, 0, 0]), (case, tma, used)  # fp32 dx: a pointer store
    assert all(torch.equal(a, b) for a, b in zip(out[True], out[False])), f"TMA and pointer paths differ ({case})"
    want = xr.double() @ W.double().t() + 1.5 * h.double() @ Bc.double().t() + b.bfloat16().double()
    err = ((out[True][0].double() - want).abs().max() / want.abs().max()).item()
    assert err <= torch.finfo(torch.bfloat16).eps, (case, err)
lt.TMA = True
# not 16-byte aligned rows (K = 36 bf16: 72 bytes): pointers, and the same answer
x = torch.randn(70, 36).bfloat16()
W, Ac, Bc = torch.randn(24, 36).bfloat16(), torch.randn(8, 36).bfloat16(), torch.randn(24, 8).bfloat16()
used.clear()
y, _, _ = lt.lora_forward(x, W, None, Ac, Bc, 2.0, "out_in")
assert used == [0], used
print("ok")
'''


@needs_triton
def test_tma_path_equals_pointer_path_bit_for_bit_in_interpreter():
    run_interpreted(TMA_PATH)


@needs_triton
def test_a_failed_tma_launch_falls_back_to_pointers_for_good_at_those_tiles(monkeypatch):
    """A triton or GPU that cannot compile the TMA GEMM at some tiles: one warning, then pointer launches at those
    tiles, this call and later; other tiles keep TMA."""
    calls = []
    def launch(tma):
        calls.append(tma)
        if tma:
            raise RuntimeError("out of resource: shared memory")
    monkeypatch.setattr(lt, "TMA", True)
    monkeypatch.setattr(lt, "_TMA_FAILED", {})
    big, small = {"BLOCK_N": 256}, {"BLOCK_N": 128}
    with pytest.warns(UserWarning, match="TMA launch failed .*shared memory"):
        lt._tma_or_pointers(launch, big)
    lt._tma_or_pointers(launch, big)
    assert calls == [True, False, False]
    lt._tma_or_pointers(lambda tma: calls.append(("small", tma)), small)
    assert calls[-1] == ("small", True) and lt.TMA is True


LAYERS = SMALL + r'''
import copy
import torch
from lora_engine import LoRASpec, inject_lora, lora_layers
from lora_engine.kernels import selfcheck
from tests.lora_engine.helpers import TOL, randomize_lora, tiny_gpt2

# one layer: the Function (forward, dx, dA, dB) through the hook against the PyTorch path and float64, the kept cast
# base (fp32 weights) and bases stored in bf16, both layouts, ranks 1-64, a second step bit for bit
for args in (("conv", torch.float32, 8, 70, 45, (3, 37)), ("linear", torch.float32, 12, 45, 70, (2, 50)),
             ("conv", torch.bfloat16, 1, 33, 64, (1, 65)), ("linear", torch.bfloat16, 64, 40, 24, (4, 20))):
    print(selfcheck.check_fused_training(*args, dev="cpu"))

# a GPT2 (four LoRA sites per block, fp32 base under bf16 autocast): every layer takes the fused kernels, the first
# block's c_attn computes no dx (its input, the embeddings' LayerNorm, needs no gradient), and the step's output
# and LoRA gradients equal the PyTorch path's and float64's
calls = {"fused": 0, "no_dx": 0}
fused, backward = lt.fused_lora_linear, lt.lora_backward
def counting(*a, **kw):
    calls["fused"] += 1
    return fused(*a, **kw)
def counting_backward(*a, **kw):
    calls["no_dx"] += a[-1] is None
    return backward(*a, **kw)
lt.fused_lora_linear, lt.lora_backward = counting, counting_backward

SITES = ["h.*.attn.c_attn", "h.*.attn.c_proj", "h.*.mlp.c_fc", "h.*.mlp.c_proj"]
m = tiny_gpt2(n_layer=2, n_embd=48).train()
m.requires_grad_(False)
inject_lora(m, LoRASpec(SITES, rank=8, alpha=16), "v")
randomize_lora(m, std=0.1)
m64 = copy.deepcopy(m).double()
ids = torch.arange(80).view(4, 20) % 64  # 80 rows: above MIN_ROWS (n_positions is 32)
def step(model, fused_on, autocast=True):
    for layer in lora_layers(model).values():
        layer.fused_training = fused_on
        for p in (layer.lora_A["v"], layer.lora_B["v"]):
            p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(ids).last_hidden_state
    out.float().square().mean().backward()
    grads = [p.grad.clone() for l in lora_layers(model).values() for p in (l.lora_A["v"], l.lora_B["v"])]
    return out.detach(), grads
got = step(m, True)
assert calls == {"fused": 8, "no_dx": 1}, calls
plain = step(m, False)
assert calls["fused"] == 8, "fused_training = False still took the fused kernels"
want = step(m64, False, autocast=False)
rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
assert rel(got[0], want[0]) < TOL[torch.bfloat16] and rel(got[0], plain[0]) < TOL[torch.bfloat16]
for g, p, w in zip(got[1], plain[1], want[1]):
    assert g.dtype == torch.float32 and rel(g, w) < 2 * TOL[torch.bfloat16], (rel(g, w), rel(p, w))
print("ok")
'''


@needs_triton
def test_fused_training_function_and_layer_hook_match_pytorch_path_and_float64_in_interpreter():
    run_interpreted(LAYERS)


@needs_triton
def test_applies_to_enough_rows_of_a_16_bit_weight_with_a_unit_stride(monkeypatch):
    W, A = torch.zeros(40, 30, dtype=torch.bfloat16), torch.zeros(8, 30, dtype=torch.bfloat16)
    x = torch.zeros(2, 40, 30)
    monkeypatch.setattr(lt, "_INTERPRET", True)  # CPU tensors count as runnable, as under TRITON_INTERPRET=1
    assert lt.applies(x, W, A) and lt.applies(x.bfloat16(), W, A) and lt.applies(x, W.t(), A)
    assert not lt.applies(x[:, :31], W, A)  # 62 rows: below MIN_ROWS
    assert not lt.applies(x, W.float(), A.float())  # an fp32 compute dtype: cuBLAS
    assert not lt.applies(x, W, A.half())  # the factors are not in the weight's dtype
    assert not lt.applies(x, W[:, ::2], A)  # no unit stride
    assert not lt.applies(x, W, torch.zeros(65, 30, dtype=torch.bfloat16))  # rank above MAX_RANK
    assert not lt.applies(x.long(), W, A)
    assert not lt.applies(x.to("meta"), W.to("meta"), A.to("meta"))
    monkeypatch.setattr(lt, "_INTERPRET", False)
    assert not lt.applies(x, W, A)  # CPU tensors, compiled triton: the PyTorch path


@needs_triton
def test_wrong_shapes_are_refused_before_launch():
    x = torch.zeros(64, 20, dtype=torch.bfloat16)
    W, A, B = (torch.zeros(30, 20, dtype=torch.bfloat16), torch.zeros(4, 20, dtype=torch.bfloat16),
               torch.zeros(30, 4, dtype=torch.bfloat16))
    bad = [(W, None, A, B, "in_out"), (W, None, A[:, :19], B, "out_in"), (W, None, A, B[:29], "out_in"),
           (W, torch.zeros(29), A, B, "out_in")]
    for args in bad:
        with pytest.raises(ValueError, match="expected W .* Ac .* bias of >= "):
            lt.lora_forward(x, *args[:4], 2.0, args[4])


def test_unknown_pass_is_refused():
    with pytest.raises(ValueError, match="the passes are"):
        lt.set_config(1280, 3840, "backward", {})


def test_backward_takes_the_separate_launches_for_good_once_the_merged_ones_fail(monkeypatch):
    """A triton that cannot compile the two-pass grids: one warning, then lora_dx + lora_factor_grads (their
    results, not the failed launch's) on this and every later call; s = 0 never tries the merged launches."""
    calls = []
    def merged(*a):
        calls.append("merged")
        raise RuntimeError("PassManager::run failed")
    monkeypatch.setattr(lt, "MERGED_BACKWARD", True)
    monkeypatch.setattr(lt, "_merged_backward", merged)
    monkeypatch.setattr(lt, "lora_dx", lambda *a: (calls.append("dx"), ("dx", "u"))[1])
    monkeypatch.setattr(lt, "lora_factor_grads", lambda xr, u, dy, h, s: (calls.append(f"grads {u}"), ("dA", "dB"))[1])
    args = ("dy", "xr", "h", "W", "Ac", "Bc")
    assert lt.lora_backward(*args, 0.0, "out_in", None) == ("dx", "dA", "dB") and calls == ["dx", "grads u"]
    calls.clear()
    with pytest.warns(UserWarning, match="merged backward launches failed .*PassManager"):
        assert lt.lora_backward(*args, 2.0, "out_in", None) == ("dx", "dA", "dB")
    assert lt.lora_backward(*args, 2.0, "out_in", None) == ("dx", "dA", "dB")
    assert calls == ["merged", "dx", "grads u", "dx", "grads u"] and lt.MERGED_BACKWARD is False
