"""merge/unmerge: in place, one rounding, exact restore after many cycles, refusal before writing."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lora_engine import LoRASpec, inject_lora, lora_layers, merge, merge_memory_bytes, set_blend, unmerge
from lora_engine.functional import delta_weight
from lora_engine.kernels import merge_triton
from lora_engine.merge import PLAN_ATTR, _fused_key
from tests.lora_engine.helpers import Stack, randomize_lora, tiny_gpt2

TARGETS = ["h.*.attn.c_attn", "h.*.attn.c_proj", "h.*.mlp.c_fc", "h.*.mlp.c_proj", "wte"]


def _gpt2_with_two_adapters(dtype, std=0.3):
    model = tiny_gpt2().to(dtype)
    inject_lora(model, LoRASpec(TARGETS, rank=4, alpha=8), "alice")
    inject_lora(model, LoRASpec(TARGETS[:2], rank=2, alpha=4), "bob")
    randomize_lora(model, std)
    return model


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bits_changed(model, snap) -> int:
    return sum(int((v.view(torch.uint8) != snap[k].view(torch.uint8)).sum()) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_1000_merge_unmerge_cycles_change_zero_bits(dtype):
    model = _gpt2_with_two_adapters(dtype)
    set_blend(model, {"alice": 0.7, "bob": 0.3})
    snap = _snapshot(model)
    for _ in range(1000):
        merge(model)
        unmerge(model)
    assert _bits_changed(model, snap) == 0


@given(dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       std=st.sampled_from([1e-3, 0.05, 0.5, 3.0]), seed=st.integers(0, 1000))
def test_merge_is_one_rounding_of_fp32_sum_and_unmerge_exact(dtype, std, seed):
    torch.manual_seed(seed)
    model = _gpt2_with_two_adapters(dtype, std)
    snap = _snapshot(model)
    weights = {"alice": 0.6, "bob": -1.3}
    merge(model, weights)
    for path, layer in lora_layers(model).items():
        names = [n for n in weights if n in layer.lora_A]
        A, B = layer.stacked(names)
        want = (snap[f"{path}.weight"].float() + delta_weight(A, B, layer.stacked_scale(
            {n: weights[n] for n in names}), layer.layout)).to(dtype)
        assert torch.equal(layer.weight.detach(), want), path
    unmerge(model)
    assert _bits_changed(model, snap) == 0


def test_merge_writes_into_the_same_storage():
    model = _gpt2_with_two_adapters(torch.float32)
    ptrs = {p: l.weight.data_ptr() for p, l in lora_layers(model).items()}
    alias = lora_layers(model)["h.0.attn.c_attn"].weight.detach()  # e.g. an engine copy sharing storage
    before = alias.clone()
    merge(model)
    assert {p: l.weight.data_ptr() for p, l in lora_layers(model).items()} == ptrs
    assert not torch.equal(alias, before)
    unmerge(model)
    assert torch.equal(alias, before)


def test_merged_model_output_equals_unmerged():
    model = _gpt2_with_two_adapters(torch.float32)
    set_blend(model, {"alice": 0.5, "bob": 0.5})
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        unmerged = model(ids).last_hidden_state
        merge(model)
        merged = model(ids).last_hidden_state
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 1e30])
def test_non_finite_or_overflowing_delta_is_refused_before_any_write(poison):
    model = _gpt2_with_two_adapters(torch.float16)
    with torch.no_grad():
        lora_layers(model)["h.1.mlp.c_proj"].lora_B["alice"][0, 0] = poison
    set_blend(model, {"alice": 1.0, "bob": 1.0})
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="h.1.mlp.c_proj"):
        merge(model)
    assert _bits_changed(model, snap) == 0
    assert all(layer.merged is None for layer in lora_layers(model).values())


def test_refusals_leave_state_alone():
    model = _gpt2_with_two_adapters(torch.float32)
    set_blend(model, {"alice": torch.tensor([1.0, 0.0]), "bob": 0.5})
    with pytest.raises(ValueError, match="per-row"):
        merge(model)
    with pytest.raises(ValueError, match="float"):
        merge(model, {"alice": torch.tensor([1.0, 0.0])})
    merge(model, {"alice": 1.0})
    with pytest.raises(RuntimeError, match="already merged"):
        merge(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        set_blend(model, {"bob": 1.0})
    unmerge(model)
    assert unmerge(model) == []


def test_memory_cost_is_one_byte_per_merged_weight_plus_factors():
    model = Stack()
    inject_lora(model, LoRASpec(["lin", "conv"], rank=2), "a")
    randomize_lora(model)
    merge(model)
    n_weights = model.lin.weight.numel() + model.conv.weight.numel()
    factors = sum(p.numel() * 4 for n, p in model.named_parameters() if ".lora_" in n) + 4 * 2 * 2
    assert n_weights <= merge_memory_bytes(model) <= n_weights + factors + 64


def test_merging_again_after_a_step_or_with_new_weights_merges_the_new_values():
    """merge, unmerge, an optimizer-style in-place step, other weights: each merge is the float64 sum of the
    values of that moment (the PyTorch path; the fused path's kept plan: tests/lora_engine/kernels)."""
    model = _gpt2_with_two_adapters(torch.float32)
    snap = _snapshot(model)
    layers = lora_layers(model)
    eps = torch.finfo(torch.float32).eps
    for weights, step in (({"alice": 0.6}, 0.0), ({"alice": 0.6}, 0.25), ({"alice": 0.9, "bob": -0.2}, 0.0)):
        with torch.no_grad():
            layers["h.0.attn.c_attn"].lora_B["alice"].add_(step)
        merge(model, weights)
        for path, layer in layers.items():
            d = sum(w * layer.scaling[n] * (layer.lora_B[n].double() @ layer.lora_A[n].double())
                    for n, w in weights.items() if n in layer.lora_A)
            d = d if layer.layout == "out_in" else d.t()
            want = snap[f"{path}.weight"].double() + d
            err = ((layer.weight.double() - want).abs() / (want.abs() + d.abs().max())).max().item()
            assert err <= 4 * eps, f"{path} after step {step} with {weights}: off by {err / eps:.1f} eps"
        unmerge(model)
        assert all(torch.equal(layer.weight.view(torch.int32), snap[f"{path}.weight"].view(torch.int32))
                   for path, layer in layers.items())
    assert PLAN_ATTR not in model.__dict__  # CPU weights: no fused plan is kept


def _fused_adamw_step(p):
    with torch.enable_grad():
        p.grad = torch.ones_like(p)
        torch.optim.AdamW([p], lr=1e-3, fused=True).step()
        p.grad = None


def test_fused_plan_key_changes_with_everything_a_kept_plan_was_built_from():
    """merge() reuses its kept fused plan (snapshot, scales, pointer tables) only while _fused_key is equal: every
    change that would make one of them stale must change the key, and reading it must not change it."""
    model = _gpt2_with_two_adapters(torch.float32)
    layers = list(lora_layers(model).values())
    weights = {"alice": 0.6, "bob": -1.3}
    assert _fused_key(layers, weights) == _fused_key(layers, dict(weights)) is not None
    A, W = layers[1].lora_A["bob"], layers[3].weight
    changes = {
        "in-place step (version)": lambda: layers[0].lora_B["alice"].add_(1e-3),
        "replaced factor storage (p.data = ...)": lambda: setattr(A, "data", A.detach().clone()),
        "adapter scale": lambda: layers[2].scaling.update(alice=3.0),
        "replaced base weight storage": lambda: setattr(W, "data", W.detach().clone()),
        "tile configuration": lambda: merge_triton.CONFIG.update(BLOCK_M=merge_triton.CONFIG["BLOCK_M"] // 2),
        "fused optimizer step (no version bump)": lambda: _fused_adamw_step(layers[0].lora_A["alice"]),
    }
    config = dict(merge_triton.CONFIG)
    try:
        for what, change in changes.items():
            before = _fused_key(layers, weights)
            with torch.no_grad():
                change()
            assert _fused_key(layers, weights) != before, what
    finally:
        merge_triton.CONFIG.update(config)
    key = _fused_key(layers, weights)
    assert _fused_key(layers, {"alice": 0.6, "bob": -1.2}) != key  # a blend weight
    assert _fused_key(layers, {"alice": 0.6}) != key  # an adapter fewer
    set_blend(model, {"alice": 0.5})
    blend_key = _fused_key(layers, None)
    set_blend(model, {"alice": 0.25})
    assert _fused_key(layers, None) != blend_key  # the active blend's weight
    set_blend(model, {"alice": torch.tensor([1.0, 0.5])})
    assert _fused_key(layers, None) is None  # per-row weights: not keyed (merge() refuses them)
    assert _fused_key(layers, {"alice": torch.tensor(0.6)}) is None and _fused_key(layers, {"alice": True}) is None
    layers[0].merged = object()
    assert _fused_key(layers, weights) is None  # a merged layer: never reused


def test_target_key_guards_where_a_kept_plan_writes_and_refuses_tensor_weights():
    """A kept plan is launched once `_target_key` matches, before the rest of its key is read (merge.py): it must
    change with every weight's storage, dtype and shape, the blend and the tiles, and never compare tensors."""
    from lora_engine.merge import _target_key
    model = _gpt2_with_two_adapters(torch.float32)
    layers = list(lora_layers(model).values())
    weights = {"alice": 0.6, "bob": -1.3}
    key = _target_key(layers, weights)
    assert key == _target_key(layers, dict(weights)) is not None
    assert _target_key(layers, {"alice": 0.6, "bob": -1.2}) != key
    W = layers[2].weight
    with torch.no_grad():
        W.data = W.detach().clone()  # new storage: the kernels would write to the old one
    assert _target_key(layers, weights) != key
    assert _target_key(layers, {"alice": torch.tensor([0.6, 0.2])}) is None
    set_blend(model, {"alice": torch.tensor([1.0, 0.5])})
    assert _target_key(layers, None) is None
    set_blend(model, {"alice": 0.5})
    blend = _target_key(layers, None)
    set_blend(model, {"alice": 0.25})
    assert _target_key(layers, None) != blend is not None
