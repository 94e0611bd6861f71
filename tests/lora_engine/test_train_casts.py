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
    _step(model, opt, x)  # builds the copies (and steps: they are stale now)
    first, second = (l.__dict__[train_casts.ATTR] for l in layers)
    assert not torch.equal(first.Ac, layers[0].lora_A["v"].detach().to(torch.bfloat16)), "the step changed nothing"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        Ac, Bc = train_casts.cast_factors(layers[0], layers[0].lora_A["v"], layers[0].lora_B["v"], torch.bfloat16)
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
    monkeypatch.setattr(train_casts, "cast_factors", lambda layer, A, B, dtype: (A.to(dtype), B.to(dtype)))
    import lora_engine.layers as layers_mod
    monkeypatch.setattr(layers_mod, "cast_factors", train_casts.cast_factors)
    losses_b = [_step(b, opt_b, x) for _ in range(4)]
    assert losses_a[0] != losses_a[-1]
    assert all(torch.equal(p, q) for p, q in zip(_params(a), _params(b))), "kept copies changed the training"
    assert torch.equal(torch.stack(losses_a), torch.stack(losses_b))


def test_replaced_parameter_storage_is_noticed():
    model = _model(2)
    layer = lora_layers(model)["0"]
    A, B = layer.lora_A["v"], layer.lora_B["v"]
    Ac = train_casts.cast_factors(layer, A, B, torch.bfloat16)[0].clone()
    A.data = torch.randn_like(A) * 3  # new storage, no version bump
    Ac2, _ = train_casts.cast_factors(layer, A, B, torch.bfloat16)
    assert torch.equal(Ac2, A.detach().to(torch.bfloat16)) and not torch.equal(Ac, Ac2)
    clone = copy.deepcopy(model)  # a copy's layer gets its own copies, never the original's
    cl = lora_layers(clone)["0"]
    Ac3, _ = train_casts.cast_factors(cl, cl.lora_A["v"], cl.lora_B["v"], torch.bfloat16)
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
