"""Live adapters on a built upstream IndexTTS2 (indextts_integration/deploy.py): apply, switch, blend, fp16,
accel mirroring and the DeepSpeed refusal, each checked against the merged gpt.pth that scripts/merge.py writes."""
from __future__ import annotations

import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from indextts_integration import model_dir as md
from indextts_integration.deploy import (RuntimeAdapterError, apply_adapter, load_indextts2, set_voice_blend,
                                         write_merged_gpt)
from indextts_integration.gpt_loss import GPTBatch, gpt_forward
from indextts_integration.upstream_tts import build_indextts2
from lora_engine import adapter_names, lora_layers
from lora_engine.adapter_io import BaseMismatchError

pytestmark = pytest.mark.upstream


@pytest.fixture(scope="module")
def adapters(random_adapter, tmp_path_factory) -> dict[str, Path]:
    """Two distinct voices on the GPT blocks and the heads."""
    out = tmp_path_factory.mktemp("adapters")
    return {name: random_adapter(out / f"{name}.safetensors", name, seed, "gpt-attn-mlp+heads")
            for seed, name in enumerate(["alice", "bob"])}


def _probe(dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(1, 9, dim, generator=torch.Generator().manual_seed(0)).to(dtype)


def _generation_logits(tts) -> torch.Tensor:
    """Mel logits of what upstream generation runs: inference_model's GPT blocks, then final_norm + mel_head."""
    im = tts.gpt.inference_model
    return _logits(im.transformer, im.lm_head, im.lm_head[1].weight.dtype)


def _logits(gpt2, head, dtype: torch.dtype) -> torch.Tensor:
    """head(gpt2(probe)). A .half() UnifiedVoice cannot run GPT2Model.forward on CPU (its null position
    embedding adds fp32 zeros, and CPU layer_norm refuses fp32 input with fp16 weights; upstream runs fp16 on
    CUDA under autocast), so in fp16 the same blocks run one after another, without the position term."""
    x = _probe(gpt2.config.n_embd, dtype)
    with torch.no_grad():
        if dtype == torch.float32:
            return head(gpt2(inputs_embeds=x).last_hidden_state)
        for block in gpt2.h:
            x = block(x)[0]
        return head(gpt2.ln_f(x))


def _reference_logits(tiny_ckpt, adapters, mix: dict[str, float], tmp_path: Path,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The same logits from a fresh UnifiedVoice loaded strictly from a merged gpt.pth (scripts/merge.py's file)."""
    gpt = md.build_unified_voice(md.load_config(tiny_ckpt)).eval()
    if mix:
        path = write_merged_gpt(tiny_ckpt, [(adapters[n], w) for n, w in mix.items()], tmp_path / "ref.pth")
        gpt.load_state_dict(torch.load(path, weights_only=True), strict=True)
    else:
        gpt.load_state_dict(md.load_gpt_state_dict(tiny_ckpt), strict=True)
    gpt = gpt.to(dtype)
    return _logits(gpt.gpt, lambda h: gpt.mel_head(gpt.final_norm(h)), dtype)


def _batch(gpt) -> GPTBatch:
    g = torch.Generator().manual_seed(1)
    D = gpt.model_dim
    return GPTBatch(conditioning=torch.randn(2, 32, D, generator=g), emo_vec=0.1 * torch.randn(2, D, generator=g),
                    text_ids=torch.randint(2, gpt.number_text_tokens, (2, 6), generator=g),
                    text_lengths=torch.tensor([6, 4]), codes=torch.randint(0, 8192, (2, 15), generator=g),
                    code_lengths=torch.tensor([15, 11]))


def test_apply_adapter_matches_the_merged_gpt_pth(tiny_ckpt, adapters, tmp_path):
    tts = load_indextts2(tiny_ckpt)
    base = _generation_logits(tts)
    assert apply_adapter(tts, adapters["alice"]) == {"alice": 1.0}
    live = _generation_logits(tts)
    assert (live - base).abs().max() > 1e-3  # the adapter really reaches generation
    torch.testing.assert_close(live, _reference_logits(tiny_ckpt, adapters, {"alice": 1.0}, tmp_path),
                               atol=2e-5, rtol=1e-5)
    # The training/scoring path through tts.gpt (get_logits) agrees with the merged file too.
    merged = md.build_unified_voice(md.load_config(tiny_ckpt)).eval()
    merged.load_state_dict(torch.load(tmp_path / "ref.pth", weights_only=True), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(gpt_forward(tts.gpt, _batch(merged)).loss, gpt_forward(merged, _batch(merged)).loss,
                                   atol=1e-5, rtol=1e-5)


def test_voices_switch_and_blend_live_without_reload(tiny_ckpt, adapters, tmp_path):
    tts = load_indextts2(tiny_ckpt, lora_path=[(adapters["alice"], 1.0), (adapters["bob"], 0.0)])
    gpt, inference_model, block = tts.gpt, tts.gpt.inference_model, tts.gpt.inference_model.transformer.h[0]
    for mix in ({"bob": 1.0}, {"alice": 0.6, "bob": 0.4}, {"alice": 1.0}):
        set_voice_blend(tts, mix)
        torch.testing.assert_close(_generation_logits(tts), _reference_logits(tiny_ckpt, adapters, mix, tmp_path),
                                   atol=2e-5, rtol=1e-5, msg=str(mix))
    set_voice_blend(tts, {})
    assert torch.equal(_generation_logits(tts), _reference_logits(tiny_ckpt, adapters, {}, tmp_path))
    assert tts.gpt is gpt and tts.gpt.inference_model is inference_model
    assert tts.gpt.inference_model.transformer.h[0] is block  # nothing was rebuilt or reloaded


def test_adapter_names_come_from_the_file_then_the_stem(tiny_ckpt, adapters, tmp_path):
    copy = tmp_path / "alice_v2.safetensors"
    copy.write_bytes(adapters["alice"].read_bytes())  # same stored name "alice"
    tts = load_indextts2(tiny_ckpt, lora_path=[(adapters["alice"], 0.5), (copy, 0.5)])
    assert sorted(adapter_names(tts.gpt)) == ["alice", "alice_v2"]
    again = apply_adapter(tts, copy)
    assert again == {"alice_v2_2": 1.0}


def test_fp16_gpt_takes_an_adapter_trained_on_the_fp32_base(tiny_ckpt, adapters, tmp_path):
    """IndexTTS2 with use_fp16 .half()s the GPT before post_init (upstream trap). CPU IndexTTS2 turns
    use_fp16 off, as upstream does, so the half GPT is handed in: the same state a GPU use_fp16 build has."""
    half = md.load_unified_voice(tiny_ckpt).half()
    tts = build_indextts2(tiny_ckpt, gpt=half)
    assert tts.gpt.gpt.h[0].attn.c_attn.weight.dtype == torch.float16
    apply_adapter(tts, adapters["alice"])  # strict base check passes through the fp16 fingerprint
    layer = lora_layers(tts.gpt)["gpt.h.0.attn.c_attn"]
    assert layer.weight.dtype == torch.float16 and layer.lora_A["alice"].dtype == torch.float32  # fp32 master
    live = _generation_logits(tts)
    assert live.dtype == torch.float16  # ... and the adapter runs in the GPT's fp16
    live = live.float()
    ref = _reference_logits(tiny_ckpt, adapters, {"alice": 1.0}, tmp_path, torch.float16).float()
    base = _reference_logits(tiny_ckpt, adapters, {}, tmp_path, torch.float16).float()
    assert (live - base).abs().max() > 10 * (live - ref).abs().max()
    torch.testing.assert_close(live, ref, atol=2e-2, rtol=2e-2)


def test_fp16_gpt_refuses_an_adapter_of_another_base(tiny_ckpt, random_adapter, tmp_path):
    stranger = random_adapter(tmp_path / "stranger.safetensors", "stranger", 2, "gpt-attn", shift_base=0.5)
    tts = build_indextts2(tiny_ckpt, gpt=md.load_unified_voice(tiny_ckpt).half())
    with pytest.raises(BaseMismatchError, match="gpt.h.0.attn.c_attn"):
        apply_adapter(tts, stranger)
    assert adapter_names(tts.gpt) == []


@pytest.fixture
def stand_in_flash_attn(monkeypatch):
    """upstream's indextts.accel imports flash_attn at module level; no machine here has it (PyPI holds only its
    source). A stand-in module lets GPT2AccelModel be imported and built, so this only checks the STRUCTURE of
    GPT2AccelModel (parameter names and the copies post_init makes), never its flash-attn kernels."""
    fake = types.ModuleType("flash_attn")

    def _no_kernel(*args, **kwargs):
        raise NotImplementedError("stand-in flash_attn: kernels are not available in this test")

    fake.flash_attn_varlen_func = fake.flash_attn_with_kvcache = _no_kernel
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    for name in [m for m in sys.modules if m.startswith("indextts.accel")]:
        monkeypatch.delitem(sys.modules, name)
    from indextts.accel import GPT2AccelModel

    return GPT2AccelModel


def _attach_accel_engine(tts, accel_cls) -> torch.nn.Module:
    """What post_init_gpt2_config does with use_accel on CUDA: a GPT2AccelModel with the GPT's weights COPIED in
    (load_state_dict strict=False), and an engine whose lm_head shares final_norm + mel_head."""
    accel = accel_cls(tts.gpt.inference_model.config).eval()
    missing, _ = accel.load_state_dict(tts.gpt.gpt.state_dict(), strict=False)
    assert not [k for k in missing if k.startswith("h.")]  # every block weight has a home in the engine
    tts.gpt.accel_engine = SimpleNamespace(model=accel, lm_head=torch.nn.Sequential(tts.gpt.final_norm,
                                                                                     tts.gpt.mel_head))
    return accel


def test_accel_engine_tensors_follow_every_voice_change(tiny_ckpt, adapters, tmp_path, stand_in_flash_attn):
    tts = load_indextts2(tiny_ckpt)
    accel = _attach_accel_engine(tts, stand_in_flash_attn)
    before = {k: v.clone() for k, v in accel.state_dict().items()}
    pointers = {k: v.data_ptr() for k, v in accel.state_dict().items()}
    apply_adapter(tts, [(adapters["alice"], 1.0), (adapters["bob"], 0.0)])
    for mix in ({"alice": 1.0}, {"alice": 0.3, "bob": 0.7}):
        set_voice_blend(tts, mix)
        ref = torch.load(write_merged_gpt(tiny_ckpt, [(adapters[n], w) for n, w in mix.items()],
                                          tmp_path / "m.pth"), weights_only=True)
        state = accel.state_dict()
        blocks = [k for k in state if k.startswith("h.") and k.endswith(".weight") and "ln_" not in k]
        assert blocks and all(torch.equal(state[k], ref["gpt." + k]) for k in blocks), mix
        assert all(torch.equal(state[k], before[k]) for k in state if k not in blocks)
        assert torch.equal(tts.gpt.accel_engine.lm_head[1].weight, ref["mel_head.weight"])  # shared head
        torch.testing.assert_close(_generation_logits(tts), _reference_logits(tiny_ckpt, adapters, mix, tmp_path),
                                   atol=2e-5, rtol=1e-5)
    assert {k: v.data_ptr() for k, v in accel.state_dict().items()} == pointers  # captured CUDA graphs stay valid
    set_voice_blend(tts, {})
    assert all(torch.equal(v, before[k]) for k, v in accel.state_dict().items())  # base restored bit for bit
    with pytest.raises(RuntimeAdapterError, match="use_accel=False"):
        set_voice_blend(tts, {"alice": torch.tensor([1.0, 0.0])})


def test_deepspeed_instance_is_refused_with_the_merge_command(tiny_ckpt, adapters):
    tts = load_indextts2(tiny_ckpt)
    tts.gpt.ds_engine = object()  # what post_init leaves after DeepSpeed kernel injection
    with pytest.raises(RuntimeAdapterError, match=r"DeepSpeed.*scripts/merge\.py --model-dir"):
        apply_adapter(tts, adapters["alice"])
    with pytest.raises(RuntimeAdapterError, match="scripts/merge.py"):
        set_voice_blend(tts, {})
    assert adapter_names(tts.gpt) == []
