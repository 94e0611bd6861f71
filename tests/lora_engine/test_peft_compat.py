"""PEFT interop against the real `peft` (a test dependency only): ours -> PEFT dir -> peft gives the same
outputs, PEFT -> ours gives the same outputs, on GPT2 (Conv1D + Embedding) and nn.Linear models; bad
PEFT directories are refused with the model unchanged.

Models run in float64. The engine keeps blend scales in float32 (layers.LoRALayer.stacked_scale), so a
scale like 8/3 differs from PEFT's float64 one by up to 6e-8 relative: EXACT (1e-12) where every scale is dyadic,
CLOSE (1e-6) otherwise."""
import json
import os
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import peft  # noqa: E402  (a dev dependency of the core tier: missing it is a failure, not a skip)

from lora_engine import LoRASpec, export_peft, import_peft, inject_lora, lora_layers, set_blend  # noqa: E402
from lora_engine.adapter_io import AdapterFileError  # noqa: E402
from tests.lora_engine.helpers import Stack, randomize_lora, tiny_gpt2  # noqa: E402
from tests.lora_engine.test_adapter_io import _assert_unchanged, _state  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 2, 33, 7], [4, 4, 60, 0, 12, 3]])
EXACT = dict(rtol=1e-12, atol=1e-12)
CLOSE = dict(rtol=1e-6, atol=1e-6)
GPT2_TARGETS = ["h.*.attn.c_attn", "h.*.attn.c_proj", "h.*.mlp.c_fc", "h.*.mlp.c_proj", "wte"]


class MLP(nn.Module):
    """A plain nn.Linear model (no Conv1D anywhere)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.up = nn.Linear(10, 24)
        self.blocks = nn.ModuleList([nn.Linear(24, 24) for _ in range(2)])
        self.down = nn.Linear(24, 6, bias=False)

    def forward(self, x):
        x = torch.tanh(self.up(x))
        for b in self.blocks:
            x = torch.tanh(b(x))
        return self.down(x)


def _gpt2(seed=0):
    return tiny_gpt2(seed=seed).double()


def _gpt2_out(model):
    with torch.no_grad():
        return model(IDS).last_hidden_state


def _peft_load(base, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about fan_in_fan_out fix-ups on mixed Linear/Conv1D models
        return peft.PeftModel.from_pretrained(base, str(path)).eval()


# ---- ours -> PEFT --------------------------------------------------------------------------------
@pytest.mark.parametrize("rslora", [False, True])
def test_gpt2_export_loads_in_real_peft_with_the_same_outputs(tmp_path, rslora):
    model = _gpt2()
    spec = LoRASpec(GPT2_TARGETS, rank=4, alpha=8, use_rslora=rslora, rank_pattern={"h.1.attn.*": 2, "wte": 8},
                    alpha_pattern={"h.0.mlp.*": 3.5})
    inject_lora(model, spec, "alice")
    randomize_lora(model)
    want = _gpt2_out(model)
    export_peft(model, tmp_path, "alice")

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["use_rslora"] is rslora
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert config["rank_pattern"] == {r"h\.1\.attn\.c_attn": 2, r"h\.1\.attn\.c_proj": 2, "wte": 8}
    got = _peft_load(_gpt2(), tmp_path)
    torch.testing.assert_close(_gpt2_out(got), want, **(CLOSE if rslora else EXACT))
    assert _gpt2_out(_gpt2()).sub(want).abs().max() > 1e-2  # the adapter matters


@given(rank=st.integers(1, 5), alpha=st.sampled_from([1.0, 7.0, 16.0]), up_rank=st.integers(1, 5),
       seed=st.integers(0, 50))
def test_linear_model_export_loads_in_real_peft_with_the_same_outputs(tmp_path_factory, rank, alpha, up_rank, seed):
    model = MLP().double()
    inject_lora(model, LoRASpec(["up", "blocks.*", "down"], rank=rank, alpha=alpha, rank_pattern={"up": up_rank}), "v")
    torch.manual_seed(seed)
    randomize_lora(model)
    x = torch.randn(5, 10, dtype=torch.float64)
    out = tmp_path_factory.mktemp("peft")
    export_peft(model, out, "v")
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    got = _peft_load(MLP().double(), out)
    with torch.no_grad():
        torch.testing.assert_close(got(x), model(x), **CLOSE)


def test_mixed_linear_conv1d_embedding_model_export(tmp_path):
    model = Stack().double()
    inject_lora(model, LoRASpec(["emb", "lin", "conv"], rank=4, alpha=5, rank_pattern={"lin": 2}), "v")
    randomize_lora(model)
    export_peft(model, tmp_path, "v")
    base = Stack().double()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    idx = torch.randint(0, 20, (3, 4))
    with torch.no_grad():
        torch.testing.assert_close(_peft_load(base, tmp_path)(idx), model(idx), **EXACT)


def test_blend_exports_as_its_exact_stacked_rank_form(tmp_path):
    model = _gpt2()
    inject_lora(model, LoRASpec(GPT2_TARGETS, rank=4, alpha=8), "alice")
    inject_lora(model, LoRASpec(["h.*.attn.c_attn", "wte"], rank=2, alpha=3, use_rslora=True), "bob")
    randomize_lora(model)
    weights = {"alice": 0.6, "bob": -1.2}
    set_blend(model, weights)
    want = _gpt2_out(model)
    export_peft(model, tmp_path, adapter=None)  # None: the active blend
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"][r"h\.0\.attn\.c_attn"] == 6 and config["alpha_pattern"][r"h\.0\.attn\.c_attn"] == 6
    torch.testing.assert_close(_gpt2_out(_peft_load(_gpt2(), tmp_path)), want, **CLOSE)


def test_an_untargeted_module_with_a_matching_suffix_is_not_caught_by_peft(tmp_path):
    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.proj = nn.Linear(6, 6)
            self.inner = nn.Sequential()
            self.inner.add_module("proj", nn.Linear(6, 6))

        def forward(self, x):
            return self.inner.proj(self.proj(x))

    model = Nested().double()
    inject_lora(model, LoRASpec(["proj"], rank=2), "v")
    randomize_lora(model)
    export_peft(model, tmp_path, "v")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == "proj"  # a regex
    got = _peft_load(Nested().double(), tmp_path)
    assert not isinstance(got.base_model.model.inner.proj, peft.tuners.lora.LoraLayer)
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(got(x), model(x), **EXACT)


# ---- PEFT -> ours --------------------------------------------------------------------------------
def _peft_adapter(base, out, safe=True, **config):
    pm = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    pm.save_pretrained(str(out), safe_serialization=safe)
    return pm.eval()


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("rslora", [False, True])
def test_real_peft_gpt2_adapter_imports_with_the_same_outputs(tmp_path, safe, rslora):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = _peft_adapter(_gpt2(), tmp_path, safe=safe, r=4, lora_alpha=8, fan_in_fan_out=True, use_rslora=rslora,
                           target_modules=["c_attn", "c_fc", "wte"], rank_pattern={"h.1.mlp.c_fc": 2},
                           alpha_pattern={"c_attn": 6})
    assert (tmp_path / ("adapter_model.safetensors" if safe else "adapter_model.bin")).is_file()
    want = _gpt2_out(pm)
    model = _gpt2()
    assert import_peft(model, tmp_path, "carol") == "carol"
    torch.testing.assert_close(_gpt2_out(model), want, **(CLOSE if rslora else EXACT))
    layer = lora_layers(model)["h.1.mlp.c_fc"]
    assert layer.lora_A["carol"].shape == (2, 32)
    assert layer.scaling["carol"] == (8 / 2 ** 0.5 if rslora else 8 / 2)
    assert lora_layers(model)["h.0.attn.c_attn"].scaling["carol"] == (6 / 2 if rslora else 6 / 4)


def test_real_peft_linear_adapter_imports_and_round_trips_bit_exact(tmp_path):
    pm = _peft_adapter(MLP().double(), tmp_path / "peft", r=3, lora_alpha=6, target_modules=["up", "down", "1"])
    x = torch.randn(4, 10, dtype=torch.float64)
    with torch.no_grad():
        want = pm(x)
    model = MLP().double()
    import_peft(model, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, **EXACT)
    assert sorted(lora_layers(model)) == ["blocks.1", "down", "up"]
    # ours -> PEFT -> ours: the same tensors, bit for bit
    export_peft(model, tmp_path / "again", "default")
    again = MLP().double()
    import_peft(again, tmp_path / "again", "default")
    for p, layer in lora_layers(model).items():
        assert torch.equal(lora_layers(again)[p].lora_A["default"], layer.lora_A["default"])
        assert torch.equal(lora_layers(again)[p].lora_B["default"], layer.lora_B["default"])
        assert lora_layers(again)[p].scaling["default"] == layer.scaling["default"]


# ---- bad PEFT directories: refused, model unchanged ----------------------------------------------------
@pytest.fixture()
def peft_dir(tmp_path):
    _peft_adapter(MLP().double(), tmp_path, r=2, lora_alpha=4, target_modules=["up", "down"])
    return tmp_path


def _edit_config(d, **changes):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_weights(d, edit):
    from safetensors.torch import load_file, save_file
    t = load_file(str(d / "adapter_model.safetensors"))
    edit(t)
    save_file(t, str(d / "adapter_model.safetensors"))


class Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/lora_engine_pwned",))


BAD_PEFT = {
    "dora": (lambda d: _edit_config(d, use_dora=True), "DoRA"),
    "bias": (lambda d: _edit_config(d, bias="all"), "trained base biases"),
    "modules_to_save": (lambda d: _edit_config(d, modules_to_save=["blocks.0"]), "full copies"),
    "not_lora": (lambda d: _edit_config(d, peft_type="IA3"), "only LORA"),
    "rank_differs_from_config": (lambda d: _edit_config(d, r=3), "rank 2 but adapter_config.json gives rank 3"),
    "no_config": (lambda d: (d / "adapter_config.json").unlink(), "no adapter_config.json"),
    "no_weights": (lambda d: (d / "adapter_model.safetensors").unlink(), "neither"),
    "truncated": (lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:-20]), "truncated or corrupt"),
    "missing_B": (lambda d: _edit_weights(d, lambda t: t.pop("base_model.model.up.lora_B.weight")),
                  r"missing lora_A or lora_B for \['up'\]"),
    "base_weights": (lambda d: _edit_weights(d, lambda t: t.update(
        {"base_model.model.up.base_layer.weight": torch.zeros(24, 10)})), "not plain LoRA"),
    "wrong_shape": (lambda d: _edit_weights(d, lambda t: t.update(
        {"base_model.model.up.lora_A.weight": torch.zeros(2, 11, dtype=torch.float64)})), r"\(in, out\) = \(10, 24\)"),
    "nan": (lambda d: _edit_weights(d, lambda t: t["base_model.model.down.lora_B.weight"].fill_(float("nan"))),
            r"NaN/inf values in the adapter of \['down'\]"),
    "missing_module": (lambda d: _edit_weights(d, lambda t: t.update(
        {k.replace(".up.", ".upp."): t.pop(k) for k in list(t) if ".up." in k})), r"do not exist in this model: \['upp'\]"),
    "pickle_bin": (lambda d: ((d / "adapter_model.safetensors").unlink(),
                              torch.save({"x": Boom()}, d / "adapter_model.bin")), "weights_only"),
}


@pytest.mark.parametrize("case", list(BAD_PEFT))
def test_bad_peft_directory_is_refused_and_model_unchanged(peft_dir, case):
    edit, message = BAD_PEFT[case]
    edit(peft_dir)
    model = MLP().double()
    inject_lora(model, LoRASpec(["blocks.*"], rank=2), "other")
    randomize_lora(model)
    before = _state(model)
    with pytest.raises(AdapterFileError, match=message):
        import_peft(model, peft_dir, "carol")
    _assert_unchanged(model, before)
    assert not os.path.exists("/tmp/lora_engine_pwned")
