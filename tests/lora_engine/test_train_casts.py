"""The training path's kept low-precision factor copies (lora_engine/train_casts.py): always equal to A.to(dtype),
B.to(dtype), refreshed for every stale layer at once after an optimizer step, and the step equal to the uncached one."""
import copy

import pytest
import torch
from torch import nn

from lora_engine import lora_layers
from lora_engine import train_casts
from tests.lora_engine.helpers import frozen_mlp_with_lora


def _model(seed: int = 0) -> nn.Module:
    return frozen_mlp_with_lora((24, 40, 16), seed)


def _step(model, opt, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def _params(model):
    return [p for n, p in model.named_parameters() if p.requires_grad]


def test_kept_copies_match_fresh_casts_and_refresh_together():
    model = _model()
    layers = list(lora_layers(model).values())
    opt = torch.optim.SGD(_params(model), lr=0.5)
    x = torch.randn(6, 24)
    before = layers[0].lora_A["v"].detach().clone()
    _step(model, opt, x)  # builds the copies, steps, and the step hook refreshes them
    assert not torch.equal(before, layers[0].lora_A["v"]), "the step changed nothing"
    for layer in layers:
        c = layer.__dict__[train_casts.ATTR]
        assert train_casts._fresh(c, layer.lora_A["v"], layer.lora_B["v"], torch.bfloat16)
        assert torch.equal(c.Ac, layer.lora_A["v"].detach().to(torch.bfloat16)), "not refreshed after the step"
    first, second = (l.__dict__[train_casts.ATTR] for l in layers)
    with torch.no_grad():
        for layer in layers:
            layer.lora_A["v"].mul_(-1.5)  # written outside any optimizer step: every copy is stale
    with torch.autocast("cpu", dtype=torch.bfloat16):
        Ac, Bc = train_casts.cast_factors(layers[0], layers[0].lora_A["v"], layers[0].lora_B["v"], torch.bfloat16)[4:6]
    assert torch.equal(Ac, layers[0].lora_A["v"].detach().to(torch.bfloat16))
    assert torch.equal(Bc, layers[0].lora_B["v"].detach().to(torch.bfloat16))
    e2 = layers[1].__dict__[train_casts.ATTR]  # refreshed by layer 0's miss, in the same multi-tensor copy
    assert e2.Ac is second.Ac and torch.equal(e2.Ac, layers[1].lora_A["v"].detach().to(torch.bfloat16))
    assert train_casts._fresh(e2, layers[1].lora_A["v"], layers[1].lora_B["v"], torch.bfloat16)


@pytest.mark.parametrize("fused", [False, True])  # fused AdamW updates in place without bumping versions
def test_training_with_kept_copies_equals_casting_every_step(monkeypatch, fused):
    x = torch.randn(6, 24)
    a, b = _model(1), _model(1)
    opt_a, opt_b = (torch.optim.AdamW(_params(m), lr=1e-2, fused=fused) for m in (a, b))
    losses_a = [_step(a, opt_a, x) for _ in range(4)]
    import lora_engine.layers as layers_mod
    monkeypatch.setattr(layers_mod, "training_casts", lambda layer, A, B, dtype, *base: None)  # cast in every pass
    losses_b = [_step(b, opt_b, x) for _ in range(4)]
    assert losses_a[0] != losses_a[-1]
    assert all(torch.equal(p, q) for p, q in zip(_params(a), _params(b))), "kept copies changed the training"
    assert torch.equal(torch.stack(losses_a), torch.stack(losses_b))


def test_replaced_parameter_storage_is_noticed():
    model = _model(2)
    layer = lora_layers(model)["0"]
    A, B = layer.lora_A["v"], layer.lora_B["v"]
    Ac = train_casts.cast_factors(layer, A, B, torch.bfloat16).Ac.clone()
    A.data = torch.randn_like(A) * 3  # new storage, no version bump
    Ac2 = train_casts.cast_factors(layer, A, B, torch.bfloat16).Ac
    assert torch.equal(Ac2, A.detach().to(torch.bfloat16)) and not torch.equal(Ac, Ac2)
    clone = copy.deepcopy(model)  # a copy's layer gets its own copies, never the original's
    cl = lora_layers(clone)["0"]
    Ac3 = train_casts.cast_factors(cl, cl.lora_A["v"], cl.lora_B["v"], torch.bfloat16).Ac
    assert Ac3.data_ptr() != Ac2.data_ptr() and torch.equal(Ac3, Ac2)


def test_no_grad_forward_after_a_fused_optimizer_step_sees_the_new_factors():
    """The layers' inference cache (cast factors for no-grad forwards, e.g. an evaluation between training steps)
    is rebuilt after a fused optimizer step, which changes the factors without bumping their versions."""
    model = _model(3)
    x = torch.randn(6, 24)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(x)  # builds the cache
    opt = torch.optim.AdamW(_params(model), lr=5e-2, fused=True)
    _step(model, opt, x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        after = model(x)
        fresh = copy.deepcopy(model)(x)  # a copy has no cache: its factors are cast anew
    assert not torch.equal(before, after)
    assert torch.equal(after, fresh)


def _kept_layer(kind: str, bias: bool, seed: int):
    torch.manual_seed(seed)
    from transformers.pytorch_utils import Conv1D
    base = nn.Linear(24, 40, bias=bias) if kind == "linear" else Conv1D(40, 24)
    if kind == "conv" and not bias:
        base.bias = None
    model = nn.Sequential(base).requires_grad_(False)
    from lora_engine import LoRASpec, inject_lora
    inject_lora(model, LoRASpec(["0"], rank=4, alpha=8), "v")
    layer = lora_layers(model)["0"]
    with torch.no_grad():
        layer.lora_B["v"].normal_(0, 0.3)
        if bias:
            layer.bias.normal_(0, 0.3)
    return model, layer


def _reference64(layer, x):
    """float64 forward and gradients (x, A, B) of the same layer, from the bf16-rounded operands autocast uses."""
    r = lambda t: t.detach().to(torch.bfloat16).double()  # noqa: E731
    W = r(layer.weight) if layer.layout == "out_in" else r(layer.weight).t()
    A, B = r(layer.lora_A["v"]).requires_grad_(), r(layer.lora_B["v"]).requires_grad_()
    xd = r(x).requires_grad_()
    y = xd @ W.t() + layer.scaling["v"] * (xd @ A.t()) @ B.t()
    if layer.bias is not None:
        y = y + r(layer.bias)
    return y, xd, A, B


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("bias", [True, False])
def test_kept_base_forward_and_gradients_equal_float64(kind, bias):
    """The "kept" form: [W; Ac] cast once, [base | h] from one GEMM, y a view of it, dx from the kept W."""
    model, layer = _kept_layer(kind, bias, seed=5)
    x = torch.randn(2, 6, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    kept = layer.__dict__[train_casts.ATTR]
    assert kept.base is not None and kept.base.shape == (44, 24), "the base was not kept"
    assert type(y.grad_fn).__name__ == "_KeptLoRAFnBackward", "eager training did not take the kept fast path"
    assert kept.Ac.data_ptr() == kept.base[40:].data_ptr(), "Ac is not the kept base's last rows"
    g = torch.randn_like(y, dtype=torch.float32)
    y.float().backward(g)
    ref, xd, A, B = _reference64(layer, x)
    ref.backward(g.double())
    tol = 2e-2
    assert y.dtype == torch.bfloat16 and y.shape == (2, 6, 40)
    assert (y.double() - ref).abs().max() <= tol * ref.abs().max()
    for got, want in ((x.grad, xd.grad), (layer.lora_A["v"].grad, A.grad), (layer.lora_B["v"].grad, B.grad)):
        assert got.dtype == torch.float32
        assert (got.double() - want).abs().max() <= tol * want.abs().max(), "gradient off"


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_kept_fast_path_equals_the_general_function_bit_for_bit(kind):
    """functional._KeptLoRAFn (eager training's usual case) runs the same GEMMs as _LoRALinearFn on the kept base: the
    same output and gradients, bit for bit, so the two cannot drift apart."""
    from lora_engine import functional as Fn
    _, layer = _kept_layer(kind, True, seed=11)
    A, B = layer.lora_A["v"], layer.lora_B["v"]
    s = layer.uniform_scale
    x = torch.randn(3, 5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        copies = train_casts.cast_factors(layer, A, B, torch.bfloat16, layer.weight, layer.bias, layer.layout)
    g = torch.randn(3, 5, 40)
    results = []
    for fast in (True, False):
        xg = x.clone().requires_grad_(True)
        A.grad = B.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = (Fn._KeptLoRAFn.apply(xg, A, B, copies.kept, s) if fast else
                 Fn._LoRALinearFn.apply(xg, layer.weight, layer.bias, A, B, layer.blend_scale, s, layer.layout,
                                        copies.tensors(), "gemm"))
        y.float().backward(g)
        results.append((y, xg.grad, A.grad, B.grad))
    for got, want in zip(*results):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_kept_base_follows_the_base_and_is_released():
    model, layer = _kept_layer("linear", True, seed=6)
    x = torch.randn(5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().sum().backward()
    first = layer.__dict__[train_casts.ATTR].base
    with torch.no_grad():
        layer.weight.mul_(-2.0)  # the frozen base written in place (as load_state_dict does)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    kept = layer.__dict__[train_casts.ATTR]
    assert kept.base is not first and torch.equal(kept.base[:40], layer.weight.detach().to(torch.bfloat16))
    want = torch.nn.functional.linear(x, layer.weight, layer.bias) + layer.scaling["v"] * (
        x @ layer.lora_A["v"].detach().t()) @ layer.lora_B["v"].detach().t()
    assert (y.float() - want).abs().max() <= 2e-2 * want.abs().max()
    train_casts.release(model)
    assert train_casts.ATTR not in layer.__dict__ and layer not in train_casts._HOLDERS, "release kept the cast base"


def test_kept_base_off_and_bf16_bases_keep_nothing():
    model, layer = _kept_layer("linear", True, seed=7)
    x = torch.randn(5, 24)
    layer.keep_cast_base = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        off = model(x)
    assert layer.__dict__[train_casts.ATTR].base is None
    layer.keep_cast_base = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        on = model(x)
    assert layer.__dict__[train_casts.ATTR].base is not None
    assert (on.float() - off.float()).abs().max() <= 2e-2 * off.float().abs().max()
    model.to(torch.bfloat16)  # a base already in the compute dtype needs no cast: nothing kept
    layer.lora_A["v"].data = layer.lora_A["v"].data.float()
    layer.lora_B["v"].data = layer.lora_B["v"].data.float()
    model(x.to(torch.bfloat16))
    assert layer.__dict__[train_casts.ATTR].base is None


def test_optimizer_steps_refresh_every_kept_copy_and_forget_a_rewritten_base():
    """After a step the copies are fresh without any forward (what a compiled graph reads: train_casts.made); a base
    written between steps is forgotten, and made again by the next training forward."""
    model, layer = _kept_layer("linear", True, seed=8)
    other, layer2 = _kept_layer("conv", True, seed=9)
    assert train_casts.prepare(model, torch.bfloat16) == 1 and train_casts.prepare(other, torch.bfloat16) == 1
    opt = torch.optim.AdamW([p for m in (model, other) for p in _params(m)], lr=1e-2)
    x = torch.randn(5, 24)
    for _ in range(2):
        _step(model, opt, x)
        with torch.no_grad():
            model(x)  # an evaluation between steps keeps them
        for l in (layer, layer2):
            kept = train_casts.made(l, l.lora_A["v"], l.lora_B["v"], torch.bfloat16)
            Ac, Bc, base, _ = kept  # what a compiled graph reads
            assert torch.equal(Ac, l.lora_A["v"].detach().to(torch.bfloat16)) and Ac.data_ptr() == base[40:].data_ptr()
            assert torch.equal(Bc, l.lora_B["v"].detach().to(torch.bfloat16))
    with torch.no_grad():
        layer.weight.add_(1.0)
    opt.step()
    assert train_casts.made(layer, layer.lora_A["v"], layer.lora_B["v"], torch.bfloat16) is None
    assert train_casts.made(layer2, layer2.lora_A["v"], layer2.lora_B["v"], torch.bfloat16) is not None
    _step(model, opt, x)
    kept = layer.__dict__[train_casts.ATTR]
    assert torch.equal(kept.base[:40], layer.weight.detach().to(torch.bfloat16))
