"""The fast paths of lora_engine.functional against a float64 reference: forward AND gradients.

The fast training path (custom autograd: alpha-folded uniform scale, per-row scales, several stacked adapters,
recast base weight) and the cached inference path must compute the same function as the plain math.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_engine import LoRASpec, inject_lora, lora_layers, set_blend
from lora_engine import compiled_op
from lora_engine import functional as Fn
from tests.lora_engine.helpers import Stack, randomize_lora


def _case(layout, dtype, ranks, per_row, batch, seq, seed, fin=10, fout=7):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(fout, fin, generator=g) * 0.3
    W = (W if layout == "out_in" else W.t().contiguous()).to(dtype)
    b = (torch.randn(fout, generator=g) * 0.3).to(dtype)
    As = [torch.randn(r, fin, generator=g) * 0.5 for r in ranks]
    Bs = [torch.randn(fout, r, generator=g) * 0.5 for r in ranks]
    ws = [torch.rand(batch, generator=g) * 2 - 0.5 if per_row else torch.tensor(1.5 - 0.4 * i)
          for i in range(len(ranks))]
    scales = [0.5 + i for i in range(len(ranks))]
    x = torch.randn(batch, seq, fin, generator=g).to(dtype)
    return W, b, As, Bs, ws, scales, x


def _reference(x, W, b, As, Bs, ws, scales, layout):
    """float64: y = base(x) + sum_i w_i s_i (x A_i^T) B_i^T, then autograd for the gradients."""
    Wd = W.double()
    y = x @ (Wd.t() if layout == "out_in" else Wd) + b.double()
    for A, B, w, s in zip(As, Bs, ws, scales):
        c = w.double().view(-1, 1, 1) * s if w.dim() == 1 else float(w) * s
        y = y + ((x @ A.t()) * c) @ B.t()
    return y


def _stacked_d(ws, scales, ranks, per_row):
    parts = [(w[:, None] * s).expand(-1, r) if per_row else torch.full((r,), float(w) * s)
             for w, s, r in zip(ws, scales, ranks)]
    return torch.cat(parts, dim=-1).float()


@settings(max_examples=60, deadline=None)
@given(layout=st.sampled_from(["out_in", "in_out"]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       ranks=st.lists(st.integers(1, 5), min_size=1, max_size=3), per_row=st.booleans(),
       batch=st.integers(1, 3), seq=st.integers(1, 4), seed=st.integers(0, 2**16),
       form=st.sampled_from(compiled_op.FORMS), x_grad=st.booleans(), bias=st.booleans())
def test_training_path_forward_and_gradients_match_float64(layout, dtype, ranks, per_row, batch, seq, seed, form,
                                                           x_grad, bias):
    """Every form of the training Function (eager "gemm", and the forms torch.compile is given: compiled_op.py),
    with and without an input gradient (the first layer needs none: "cat" then takes u from its own GEMM)."""
    W, b, As, Bs, ws, scales, x = _case(layout, dtype, ranks, per_row, batch, seq, seed)
    b = b if bias else None
    d = _stacked_d(ws, scales, ranks, per_row)
    uniform = None if per_row or len(set(float(w) * s for w, s in zip(ws, scales))) > 1 else float(ws[0]) * scales[0]
    A = torch.cat(As).requires_grad_(True)
    B = torch.cat(Bs, 1).requires_grad_(True)
    xg = x.clone().requires_grad_(x_grad)
    y = Fn.lora_linear(xg, W, b, A, B, d, layout, uniform) if form == "gemm" else \
        Fn._LoRALinearFn.apply(xg, W, b, A, B, d, uniform, layout, None, form)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1))
    grads = torch.autograd.grad(y.float().mul(dy).sum(), [xg, A, B] if x_grad else [A, B])
    gx, gA, gB = grads if x_grad else (None, *grads)

    xr = x.double().requires_grad_(True)
    Ar = [a.double().requires_grad_(True) for a in As]
    Br = [m.double().requires_grad_(True) for m in Bs]
    b0 = torch.zeros(W.shape[0] if layout == "out_in" else W.shape[1]) if b is None else b
    yr = _reference(xr, W, b0, Ar, Br, ws, scales, layout)
    rx, *rAB = torch.autograd.grad(yr.mul(dy.double()).sum(), [xr, *Ar, *Br])
    rA, rB = torch.cat(rAB[:len(As)]), torch.cat(rAB[len(As):], 1)

    # the same math on the operands' magnitudes: what each result's rounding error scales with (a sum that cancels,
    # e.g. h = x A^T of rank 1 near zero, is exact to fp32 of its terms, not of itself)
    xa = x.double().abs().requires_grad_(True)
    Aa = [a.double().abs().requires_grad_(True) for a in As]
    Ba = [m.double().abs().requires_grad_(True) for m in Bs]
    ya = _reference(xa, W.abs(), b0.abs(), Aa, Ba, [w.abs() for w in ws], scales, layout)
    mx, *mAB = torch.autograd.grad(ya.mul(dy.double().abs()).sum(), [xa, *Aa, *Ba])
    mA, mB = torch.cat(mAB[:len(As)]), torch.cat(mAB[len(As):], 1)

    assert y.dtype == dtype and gA.dtype == gB.dtype == torch.float32  # grads in the fp32 masters' dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 4e-2}[dtype]  # relative to the magnitudes; bf16: 8-bit mantissa
    assert y.is_contiguous()  # also in "cat", whose GEMM output is [base | h]
    checks = [("y", y, yr, ya), ("dx", gx, rx, mx), ("dA", gA, rA, mA), ("dB", gB, rB, mB)]
    for what, got, want, magnitude in [c for c in checks if x_grad or c[0] != "dx"]:
        err = (got.double() - want).norm() / magnitude.norm().clamp_min(1e-12)
        assert err <= tol, f"{what}: error {err:.2e} of the magnitudes > {tol:.0e}"


@pytest.mark.parametrize("form", compiled_op.FORMS)
@pytest.mark.parametrize("bias", [True, False])
def test_forms_above_the_unrolled_rank_use_gemms_and_match_float64(form, bias):
    """Ranks above functional.MAX_UNROLLED_RANK take the GEMM up-projection in every form (in "cat" accumulated into
    the view of [base | h]): the output is still contiguous and equal to the float64 math."""
    W, b, As, Bs, ws, scales, x = _case("in_out", torch.float32, [Fn.MAX_UNROLLED_RANK + 4], False, 2, 3, 11)
    d = _stacked_d(ws, scales, [Fn.MAX_UNROLLED_RANK + 4], False)
    A, B = As[0].clone().requires_grad_(True), Bs[0].clone().requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    y = Fn._LoRALinearFn.apply(xg, W, b if bias else None, A, B, d, None, "in_out", None, form)
    assert y.is_contiguous()
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(y.mul(dy).sum(), [xg, A, B])
    ref = [t.double().requires_grad_(True) for t in (x, As[0], Bs[0])]
    b0 = b if bias else torch.zeros(W.shape[1])
    yr = _reference(ref[0], W, b0, [ref[1]], [ref[2]], ws, scales, "in_out")
    want = torch.autograd.grad(yr.mul(dy.double()).sum(), ref)
    for what, g, w in zip(("y", "dx", "dA", "dB"), (y, *got), (yr, *want)):
        err = (g.double() - w).norm() / w.norm()
        assert err <= 1e-5, f"{form} {what}: relative error {err:.2e}"


def test_uniform_scale_is_folded_and_equals_the_tensor_scale_path():
    """The alpha-folded single-adapter path and the generic tensor-d path give the same forward and grads."""
    W, b, As, Bs, ws, scales, x = _case("in_out", torch.float32, [4], False, 2, 3, 0)
    d = _stacked_d(ws, scales, [4], False)
    outs = []
    for s in (float(ws[0]) * scales[0], None):
        A, B = As[0].clone().requires_grad_(True), Bs[0].clone().requires_grad_(True)
        y = Fn.lora_linear(x, W, b, A, B, d, "in_out", s)
        y.square().sum().backward()
        outs.append((y.detach(), A.grad, B.grad))
    for a, c in zip(*outs):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_autocast_keeps_one_low_precision_copy_and_matches_float64():
    """Under bf16 autocast an fp32 base runs in bf16: the result stays within bf16 error of the float64 math."""
    W, b, As, Bs, ws, scales, x = _case("out_in", torch.float32, [3, 2], False, 2, 5, 7, fin=32, fout=24)
    d = _stacked_d(ws, scales, [3, 2], False)
    A = torch.cat(As).requires_grad_(True)
    B = torch.cat(Bs, 1).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = Fn.lora_linear(x, W, b, A, B, d, "out_in")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    want = _reference(x.double(), W, b, [a.double() for a in As], [m.double() for m in Bs], ws, scales, "out_in")
    err = (y.double() - want).norm() / want.norm()
    assert err < 1e-2 and A.grad is not None and torch.isfinite(B.grad).all()


def _layer():
    model = Stack()
    inject_lora(model, LoRASpec(["conv"], rank=3, alpha=6), "a")
    inject_lora(model, LoRASpec(["conv"], rank=2, alpha=2), "b")
    randomize_lora(model)
    return model, lora_layers(model)["conv"]


def test_inference_cache_follows_optimizer_steps_and_blend_changes():
    model, layer = _layer()
    set_blend(model, {"a": 1.0})
    x = torch.randn(2, 3, 12)
    with torch.no_grad():
        before = layer(x)
        layer.lora_B["a"].add_(0.5)  # an in-place update, as an optimizer step makes
        after = layer(x)
        set_blend(model, {"a": 0.3, "b": -1.2})
        blended = layer(x)
    W, bias = layer.weight.double(), layer.bias.double()

    def want(mix):
        y = x.double() @ W + bias
        for n, w in mix.items():
            y = y + (x.double() @ layer.lora_A[n].double().t()) @ layer.lora_B[n].double().t() * (w * layer.scaling[n])
        return y
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after.double(), want({"a": 1.0}), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(blended.double(), want({"a": 0.3, "b": -1.2}), rtol=1e-4, atol=1e-4)


def test_inference_cache_is_refreshed_in_place_and_never_aliases_parameters():
    """set_blend rewrites the cached factors in their storage (a captured CUDA graph keeps reading them)."""
    model, layer = _layer()
    set_blend(model, {"a": 1.0, "b": 0.5})
    with torch.no_grad():
        layer(torch.randn(1, 1, 12))
    _, A1, B1 = layer._factors
    ptrs = (A1.data_ptr(), B1.data_ptr())
    set_blend(model, {"a": -0.25, "b": 2.0})
    _, A2, B2 = layer._factors
    assert (A2.data_ptr(), B2.data_ptr()) == ptrs
    d = layer.blend_scale
    torch.testing.assert_close(B2, torch.cat([layer.lora_B["a"], layer.lora_B["b"]], 1).detach() * d)
    params = {p.data_ptr() for p in layer.parameters()}
    assert not params & set(ptrs)


def test_per_row_inference_uses_the_cache_and_matches_training_path():
    model, layer = _layer()
    rows = torch.tensor([1.0, 0.0, 0.5])
    set_blend(model, {"a": rows, "b": 1.0 - rows})
    x = torch.randn(3, 4, 12)
    with torch.no_grad():
        fast = layer(x)
    slow = layer(x.requires_grad_(True))  # grad-enabled: the autograd path
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-5)
    assert layer.uniform_scale is None


@pytest.mark.parametrize("bad_rows", [2, 4])
def test_per_row_length_mismatch_is_refused_on_both_paths(bad_rows):
    model, layer = _layer()
    set_blend(model, {"a": torch.ones(3)})
    x = torch.randn(bad_rows, 2, 12)
    with pytest.raises(ValueError, match="per-row"):
        with torch.no_grad():
            layer(x)
    with pytest.raises(ValueError, match="per-row"):
        layer(x.requires_grad_(True))


def test_inference_cache_follows_the_model_to_another_device_and_dtype():
    """A cache built on one device/dtype is not reused after model.to(...) (storage replaced, no version bump)."""
    model, layer = _layer()
    set_blend(model, {"a": 1.0})
    with torch.no_grad():
        layer(torch.randn(1, 2, 12))
        model.to("meta")
        y = layer(torch.randn(1, 2, 12, device="meta"))
    assert y.device.type == "meta" and layer._factors[1].device.type == "meta"
    model2, layer2 = _layer()
    set_blend(model2, {"a": 1.0})
    x = torch.randn(1, 2, 12)
    with torch.no_grad():
        layer2(x)
        with torch.no_grad():
            for p in layer2.lora_B.values():
                p.data = p.data * 3  # new storage, no version bump
        got = layer2(x)
    W, b = layer2.weight.double(), layer2.bias.double()
    want = x.double() @ W + b + (x.double() @ layer2.lora_A["a"].double().t()) @ layer2.lora_B["a"].double().t() * layer2.scaling["a"]
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
