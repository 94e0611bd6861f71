"""inject_lora / remove_adapter / uninject_lora on real transformers models."""
import pytest
import torch
from torch import nn

from lora_engine import (LoRAConv1D, LoRAEmbedding, LoRALinear, LoRASpec, adapter_names, get_blend,
                         inject_lora, lora_layers, remove_adapter, set_blend, uninject_lora)
from tests.lora_engine.helpers import Stack, randomize_lora, tiny_gpt2


def test_injection_hits_targets_and_keeps_base_state_dict_keys():
    model = tiny_gpt2()
    base = model.state_dict()
    names = inject_lora(model, LoRASpec(["h.*.attn.c_attn", "h.*.mlp.c_fc", "wte"], rank=4), "alice")
    assert names == ["h.0.attn.c_attn", "h.1.attn.c_attn", "h.0.mlp.c_fc", "h.1.mlp.c_fc", "wte"]
    assert isinstance(model.h[0].attn.c_attn, LoRAConv1D) and isinstance(model.wte, LoRAEmbedding)
    sd = model.state_dict()
    assert set(base) <= set(sd)
    assert {k for k in sd if k not in base} == {f"{n}.lora_{ab}.alice" for n in names for ab in "AB"}
    assert all(sd[k].data_ptr() == v.data_ptr() for k, v in base.items())  # same storage, not copies
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {k for k in sd if ".lora_" in k}


def test_fresh_adapter_is_a_no_op_and_active():
    model = tiny_gpt2()
    ids = torch.randint(0, 64, (2, 7))
    before = model(ids).last_hidden_state
    inject_lora(model, LoRASpec(["h.*.attn.c_attn", "wte"], rank=4), "a")
    assert torch.equal(model(ids).last_hidden_state, before)
    assert get_blend(model) == {"a": 1.0}


def test_second_adapter_shares_layers_and_becomes_the_trainable_one():
    model = tiny_gpt2()
    inject_lora(model, LoRASpec(["h.*.attn.c_attn"], rank=4), "alice")
    inject_lora(model, LoRASpec(["h.0.attn.*"], rank=2), "bob")
    layer = lora_layers(model)["h.0.attn.c_attn"]
    assert layer.adapters == ["alice", "bob"] and layer.lora_B["bob"].shape == (96, 2)
    assert isinstance(model.h[0].attn.c_proj, LoRAConv1D)
    assert not layer.lora_A["alice"].requires_grad and layer.lora_A["bob"].requires_grad
    assert get_blend(model) == {"bob": 1.0}
    with pytest.raises(ValueError, match="already injected"):
        inject_lora(model, LoRASpec(["h.1.mlp.c_fc"]), "alice")


def test_unmatched_pattern_lists_near_misses_and_changes_nothing():
    model = tiny_gpt2()
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn"):
        inject_lora(model, LoRASpec(["h.*.attn.c_attn", "h.*.atn.c_attn"]), "a")
    assert lora_layers(model) == {}
    with pytest.raises(ValueError, match="unsupported kind"):
        inject_lora(model, LoRASpec(["h.*.ln_1"]), "a")


def test_rank_and_alpha_patterns_and_rslora():
    model = tiny_gpt2()
    spec = LoRASpec(["h.*.attn.c_attn", "h.*.mlp.c_fc"], rank=4, alpha=8, rank_pattern={"h.*.mlp.*": 2},
                    alpha_pattern={"h.1.**": 1.0}, use_rslora=True)
    inject_lora(model, spec, "a")
    layers = lora_layers(model)
    assert layers["h.0.mlp.c_fc"].lora_A["a"].shape[0] == 2
    assert layers["h.0.attn.c_attn"].scaling["a"] == pytest.approx(8 / 2)
    assert layers["h.1.attn.c_attn"].scaling["a"] == pytest.approx(1 / 2)


def test_shared_module_is_wrapped_under_every_parent():
    model = Stack()
    model.alias = nn.Sequential(model.lin)  # the same Linear under a second parent (a tied head, say)
    inject_lora(model, LoRASpec(["lin"], rank=2), "a")
    assert model.alias[0] is model.lin and isinstance(model.lin, LoRALinear)


def test_remove_and_uninject_restore_the_original_modules():
    model = tiny_gpt2()
    original = {n: m for n, m in model.named_modules()}
    keys = set(model.state_dict())
    ids = torch.randint(0, 64, (2, 5))
    before = model(ids).last_hidden_state
    inject_lora(model, LoRASpec(["h.*.attn.c_attn", "wte"]), "a")
    inject_lora(model, LoRASpec(["h.*.attn.c_attn"]), "b")
    randomize_lora(model)
    set_blend(model, {"a": 1.0, "b": 1.0})
    remove_adapter(model, "a")
    assert adapter_names(model) == ["b"] and model.wte is original["wte"]
    assert get_blend(model) == {"b": 1.0}
    uninject_lora(model)
    assert all(m is original[n] for n, m in model.named_modules())
    assert set(model.state_dict()) == keys
    assert torch.equal(model(ids).last_hidden_state, before)
    with pytest.raises(KeyError):
        remove_adapter(model, "a")


def test_bad_adapter_names_are_refused():
    for bad in ["", "a.b"]:
        with pytest.raises(ValueError):
            inject_lora(tiny_gpt2(), LoRASpec(["wte"]), bad)
