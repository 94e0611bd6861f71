"""On a CUDA machine: every fused path against its plain reference (run by `benchmarks/run_all.py --check`).

CI has no GPU, so this is where the Triton kernels and the CUDA-only GEMM forms are proven: bit-exact restore
(overflow list included), refusal before any write, agreement with the PyTorch merge, and the training fast
path's forward/gradients against float64.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from lora_engine import LoRASpec, inject_lora, lora_layers, merge, unmerge
from lora_engine import functional as Fn
from lora_engine.kernels import merge_triton
from lora_engine.merge import PLAN_ATTR, FusedMergeRecord, base_weight

# the tiles before benchmarks/NOTES.md (18), with other unmerge tiles: merge and unmerge must not depend on them
OTHER_TILES = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, U_BLOCK_M=32, U_BLOCK_N=64, U_num_warps=8)


class _Pair(nn.Module):
    def __init__(self, dtype: torch.dtype):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.lin = nn.Linear(192, 160)
        self.conv = Conv1D(224, 192)
        nn.init.normal_(self.conv.weight, std=0.02)
        with torch.no_grad():  # tiny and signed-zero weights: the corrections that overflow int8
            self.lin.weight[:4] = 1e-6 * torch.randn(4, 192)
            self.conv.weight[:, :3] = 0.0
        self.to("cuda", dtype)


def _model(dtype: torch.dtype, n_adapters: int, rank: int = 8) -> nn.Module:
    torch.manual_seed(0)
    model = _Pair(dtype)
    for i in range(n_adapters):
        inject_lora(model, LoRASpec(["lin", "conv"], rank=rank, alpha=2 * rank), f"a{i}")
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in list(layer.lora_A.values()) + list(layer.lora_B.values()):
                p.normal_(0, 0.3)
    return model


@contextlib.contextmanager
def _tiles(**tiles):
    """merge_triton.CONFIG updated with `tiles` inside the block, as it was after it."""
    saved = dict(merge_triton.CONFIG)
    merge_triton.CONFIG.update(tiles)
    try:
        yield
    finally:
        merge_triton.CONFIG.clear()
        merge_triton.CONFIG.update(saved)


def check_merge(dtype: torch.dtype, n_adapters: int) -> str:
    """The fused merge: within 4 eps of the PyTorch merge, the same W' bit for bit at other tiles (and unmerged
    exactly at other tiles), exact base_weight, 50 exact cycles, a NaN adapter refused with nothing written."""
    model = _model(dtype, n_adapters)
    layers = lora_layers(model)
    original = {p: l.weight.detach().clone() for p, l in layers.items()}
    mix = {f"a{i}": 0.7 - 0.3 * i for i in range(n_adapters)}
    with _tiles(**OTHER_TILES):  # W' at other tiles (unmerged on yet others), compared bit for bit below
        merge(model, mix)
        other = {p: l.weight.detach().clone() for p, l in layers.items()}
    unmerge(model)
    assert all(torch.equal(l.weight.detach(), original[p]) for p, l in layers.items()), "unmerge at other tiles"
    merge(model, mix)
    differ = sum(int((l.weight.detach().view(torch.uint8) != other[p].view(torch.uint8)).sum())
                 for p, l in layers.items())
    assert differ == 0, f"merges at two tile shapes differ in {differ} bytes (delta depends on the tiles)"
    recs = {p: l.merged for p, l in layers.items()}
    assert all(isinstance(r, FusedMergeRecord) for r in recs.values()), "fused path not taken"
    overflow = sum(r.group.ov_total for r in {id(r.group): r for r in recs.values()}.values())
    worst = 0.0
    for p, l in layers.items():
        A, B = l.stacked(list(mix))
        delta = Fn.delta_weight(A.detach(), B.detach(), l.stacked_scale(mix).float(), l.layout)
        want = (original[p].float() + delta).to(dtype).float()
        err = (l.weight.detach().float() - want).abs() / (want.abs() + delta.abs().max())
        worst = max(worst, err.max().item() / torch.finfo(dtype).eps)  # in units of the dtype's epsilon
        assert torch.equal(base_weight(l), original[p]), f"base_weight of merged {p} not exact"
    assert worst <= 4.0, f"fused merge differs from the PyTorch merge by {worst:.2f} eps"
    for cycle in range(50):
        unmerge(model)
        merge(model, mix if cycle % 2 else {"a0": 1.0})
    unmerge(model)
    changed = sum(int((l.weight.detach() != original[p]).sum()) for p, l in layers.items())
    assert changed == 0, f"{changed} elements changed after 50 fused merge/unmerge cycles"
    short = _short_overflow_list(model, layers, original)
    with torch.no_grad():
        layers["lin"].lora_B["a0"][0, 0] = float("nan")
    try:
        merge(model, {"a0": 1.0})
        raise AssertionError("a NaN adapter was merged")
    except ValueError:
        pass
    assert all(torch.equal(l.weight.detach(), original[p]) for p, l in layers.items()), "refusal wrote weights"
    return (f"fused merge {dtype} x{n_adapters}: exact restore after 50 cycles, overflow entries {overflow}, "
            f"max diff vs torch merge {worst:.2f} eps, same W' at other tiles, {short}, NaN refused untouched")


def _short_overflow_list(model: nn.Module, layers: dict, original: dict) -> str:
    """A fresh plan whose overflow list has one slot: the elements without one are left unchanged, the groups redone
    at the exact size, and the merge equals a plain one; unmerged exactly."""
    mix = {"a0": 0.55}  # a blend no kept plan has: planned afresh, its groups' lists made at default_capacity
    merge(model, mix)
    plain = {p: l.weight.detach().clone() for p, l in layers.items()}
    unmerge(model)
    default_capacity = merge_triton.default_capacity
    merge_triton.default_capacity = lambda g: 1
    try:
        model.__dict__.pop(PLAN_ATTR, None)
        merge(model, mix)
    finally:
        merge_triton.default_capacity = default_capacity
    groups = {id(l.merged.group): l.merged.group for l in layers.values()}.values()
    assert all(torch.equal(l.weight.detach(), plain[p]) for p, l in layers.items()), "short list: merge differs"
    unmerge(model)
    assert all(torch.equal(l.weight.detach(), original[p]) for p, l in layers.items()), "short list: unmerge"
    return f"short overflow list redone at {sum(g.capacity for g in groups)} slots"


def check_training_path(dtype: torch.dtype) -> str:
    torch.manual_seed(1)
    x = torch.randn(4, 33, 256, device="cuda", requires_grad=True)
    W = (torch.randn(256, 320, device="cuda") * 0.05).to(dtype)
    b = torch.randn(320, device="cuda").to(dtype)
    A = (torch.randn(8, 256, device="cuda") * 0.1).requires_grad_(True)
    B = (torch.randn(320, 8, device="cuda") * 0.1).requires_grad_(True)
    d = torch.full((8,), 2.0, device="cuda")
    dy = torch.randn(4, 33, 320, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = Fn.lora_linear(x, W, b, A, B, d, "in_out", 2.0)
    got = torch.autograd.grad(y.float().mul(dy).sum(), [x, A, B])
    xr, Ar, Br = (t.detach().double().requires_grad_(True) for t in (x, A, B))
    yr = xr @ W.double() + b.double() + 2.0 * (xr @ Ar.t()) @ Br.t()
    want = torch.autograd.grad(yr.mul(dy.double()).sum(), [xr, Ar, Br])
    errs = [((g.double() - w).norm() / w.norm()).item() for g, w in zip((y, *got), (yr, *want))]
    assert max(errs) < 2e-2, f"training fast path vs float64: {errs}"
    assert got[1].dtype == got[2].dtype == torch.float32
    return f"training fast path (bf16 autocast, {dtype} base): rel errs {', '.join(f'{e:.1e}' for e in errs)}"


def check_fused_training(kind: str, base_dtype: torch.dtype, rank: int, n_in: int, n_out: int, rows: tuple,
                         dev: str = "cuda") -> str:
    """One LoRA layer's training step (bf16 autocast, fp32 x as LayerNorm gives it) through the fused kernels
    (kernels/lora_train_triton.py) against the PyTorch fast path and float64: y, dx, dA, dB each within
    max(2x the PyTorch path's error, 4e-3) of float64, the same bits on a second step. `kind` "linear" or "conv";
    `base_dtype` fp32 (the kept cast base) or bf16 (a base stored in the compute dtype); `rows` x's leading dims
    (ragged on purpose). `dev` "cpu" runs it in Triton's interpreter (the CI tests)."""
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(rank + n_in)
    base = nn.Linear(n_in, n_out) if kind == "linear" else Conv1D(n_out, n_in)
    nn.init.normal_(base.weight, std=n_in ** -0.5)
    nn.init.normal_(base.bias, std=0.1)
    model = nn.Sequential(base).to(dev).requires_grad_(False)
    inject_lora(model, LoRASpec(["0"], rank=rank, alpha=2 * rank), "a")
    model.to(base_dtype)  # the factors stay fp32 masters below
    layer = lora_layers(model)["0"]
    A, B = layer.lora_A["a"], layer.lora_B["a"]
    with torch.no_grad():
        A.data, B.data = A.data.float(), B.data.float().normal_(0, 0.3)  # the LoRA term matters
    x = torch.randn(*rows, n_in, device=dev)
    g = torch.randn(*rows, n_out, device=dev)

    def step(fused: bool) -> tuple:
        layer.fused_training = fused
        xg = x.clone().requires_grad_(True)
        A.grad = B.grad = None
        with torch.autocast(dev, dtype=torch.bfloat16):
            y = model(xg)
        took = type(y.grad_fn).__name__
        y.float().backward(g)
        return took, (y, xg.grad, A.grad, B.grad)
    took, fused = step(True)
    assert took == "FusedLoRAFnBackward", f"fused training kernels not taken ({kind}, {base_dtype}): {took}"
    assert all(torch.equal(a, b) for a, b in zip(fused, step(True)[1])), "fused training: a second step differs"
    _, plain = step(False)
    layer.fused_training = True
    r = lambda t: t.detach().to(torch.bfloat16).double()  # noqa: E731  the operands autocast rounds
    W = r(layer.weight) if layer.layout == "out_in" else r(layer.weight).t()
    xd, Ad, Bd = r(x).requires_grad_(), r(A).requires_grad_(), r(B).requires_grad_()
    yd = xd @ W.t() + r(layer.bias) + layer.scaling["a"] * (xd @ Ad.t()) @ Bd.t()
    yd.backward(g.double())
    errs = []
    for name, f, p, want in zip(("y", "dx", "dA", "dB"), fused, plain, (yd, xd.grad, Ad.grad, Bd.grad)):
        ef, ep = (((t.double() - want).norm() / want.norm()).item() for t in (f, p))
        assert f.dtype == p.dtype and f.shape == p.shape, \
            f"fused {name}: {f.dtype} {f.shape}, PyTorch {p.dtype} {p.shape}"
        assert ef <= max(2 * ep, 4e-3), f"fused training {name} ({kind}, {base_dtype}, r{rank}): {ef:.1e} vs {ep:.1e}"
        errs.append(ef)
    return (f"fused training {kind} {base_dtype} r{rank} {n_in}->{n_out} x{list(rows)}: rel errs vs float64 "
            + ", ".join(f"{e:.1e}" for e in errs))


def check_decode_kernel(layout: str, n_adapters: int) -> str:
    """The one-launch decode kernel (lora_gemv_triton) against the two-GEMM cached path and float64, with decode's
    tiles and, on the long-input layer, SPLIT 4 and 8 (what tune_gemv.py sweeps there); the same bits on 20
    relaunches (whichever program of a column block arrives last) and on CUDA graph replays, the counters zeroed."""
    cases = ((1280, 3840, None), (5120, 1280, None), (5120, 1280, 4), (5120, 1280, 8))
    return "; ".join(_decode_kernel_case(layout, n_adapters, inp, out, split) for inp, out, split in cases)


def _decode_kernel_case(layout: str, n_adapters: int, inp: int, out: int, split: int | None) -> str:
    from lora_engine.kernels import lora_gemv_triton as gemv
    R = 8 * n_adapters
    tiles = {**gemv.default_config(inp, out, R), **gemv.TUNED.get((inp, out), {})}  # what decode launches
    pinned = gemv.TUNED.get((inp, out))
    if split is not None:
        tiles["SPLIT"] = split
        gemv.set_config(inp, out, tiles)  # through TUNED: the launch decode takes (direct after the first)
    try:
        worst = _decode_kernel_errors(gemv, layout, R, inp, out)
    finally:
        if split is not None:
            gemv.set_config(inp, out, pinned)
    assert all(not c.any() for _, c in gemv._scratch.values()), "decode kernel: arrival counters left non-zero"
    return f"decode kernel {layout} {inp}->{out} split {tiles['SPLIT']} R={R}: rel err vs float64 {worst:.1e}"


def _decode_kernel_errors(gemv, layout: str, R: int, inp: int, out: int) -> float:
    """The worst error relative to float64 over 1, 3 and 8 rows; asserts relaunches and graph replays agree."""
    torch.manual_seed(2)
    W = (torch.randn((out, inp) if layout == "out_in" else (inp, out), device="cuda") * 0.02).to(torch.bfloat16)
    bias = (torch.randn(out, device="cuda") * 0.1).to(torch.bfloat16)
    A = torch.randn(R, inp, device="cuda") / inp ** 0.5
    B = torch.randn(out, R, device="cuda") * 0.05
    Ac, Bd = A.to(torch.bfloat16), Fn.fold_scale(B, torch.full((R,), 0.5, device="cuda"), torch.bfloat16)
    worst = 0.0
    for rows in (1, 3, 8):
        x = torch.randn(rows, 1, inp, device="cuda")  # fp32, as LayerNorm gives it under autocast
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            assert gemv.applies(x, W, Ac), "the decode kernel does not take a bf16 one-token forward"
            got = gemv.lora_gemv(x, W, bias, Ac, Bd, layout)
            same = all(torch.equal(got, gemv.lora_gemv(x, W, bias, Ac, Bd, layout)) for _ in range(20))
            assert same, f"decode kernel {layout} {inp}->{out} rows={rows}: a relaunch differs"
            ref = Fn.lora_linear_cached(x, W, bias, Ac, Bd, None, layout)
        xr = x.to(torch.bfloat16).double().reshape(rows, inp)
        Wd = W.double() if layout == "in_out" else W.double().t()
        want = (xr @ Wd + bias.double() + (xr @ Ac.double().t()) @ Bd.double().t()).reshape(got.shape)
        err = ((got.double() - want).norm() / want.norm()).item()
        err_ref = ((ref.double() - want).norm() / want.norm()).item()
        assert err <= max(2 * err_ref, 4e-3), \
            f"decode kernel {layout} {inp}->{out} rows={rows}: rel err {err:.1e} (cuBLAS {err_ref:.1e})"
        worst = max(worst, err)
    x = torch.randn(1, 1, inp, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        with torch.cuda.graph(graph):  # its own stream: the scratch for it is made here, once
            y = gemv.lora_gemv(x, W, bias, Ac, Bd, layout)
        for _ in range(3):
            x.copy_(torch.randn_like(x))
            graph.replay()
            assert torch.equal(y, gemv.lora_gemv(x, W, bias, Ac, Bd, layout)), \
                f"decode kernel {layout} {inp}->{out}: a CUDA graph replay differs from the eager launch"
    return worst


def run_all() -> list[str]:
    lines = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for n in (1, 4):
            lines.append(check_merge(dtype, n))
        lines.append(check_training_path(dtype))
    for layout in ("in_out", "out_in"):
        for n in (1, 4):
            lines.append(check_decode_kernel(layout, n))
    for kind, base_dtype, rank, n_in, n_out, rows in (
            ("conv", torch.float32, 8, 1280, 3840, (8, 512)), ("conv", torch.float32, 16, 5120, 1280, (8, 512)),
            ("linear", torch.float32, 8, 200, 333, (3, 111)), ("conv", torch.bfloat16, 12, 333, 200, (1, 97)),
            ("linear", torch.bfloat16, 64, 1280, 1280, (2, 300)), ("conv", torch.float32, 1, 96, 80, (5, 13))):
        lines.append(check_fused_training(kind, base_dtype, rank, n_in, n_out, rows))
    return lines
