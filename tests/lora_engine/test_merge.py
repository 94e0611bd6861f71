"""merge/unmerge: in place, one rounding, exact restore after many cycles, refusal before writing."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lora_engine import LoRASpec, inject_lora, lora_layers, merge, merge_memory_bytes, set_blend, unmerge
from lora_engine.functional import delta_weight
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
