"""The tiny checkpoint has the real layout, and every component loads through the model-dir loaders."""
from __future__ import annotations

import pytest
import torch

from indextts_integration import model_dir as md
from indextts_integration.demo_sentences import DEMO_SENTENCES

pytestmark = pytest.mark.upstream


def test_layout_matches_real_checkpoints(tiny_ckpt):
    cfg = md.load_config(tiny_ckpt)
    for key in ("gpt_checkpoint", "w2v_stat", "s2mel_checkpoint", "emo_matrix", "spk_matrix"):
        assert md.model_file(tiny_ckpt, cfg[key]).is_file(), key
    assert md.model_file(tiny_ckpt, cfg.dataset["bpe_model"]).is_file()
    for repo in (md.W2V_BERT_REPO, md.MASKGCT_REPO, md.CAMPPLUS_REPO, cfg.vocoder.name):
        assert md.resolve_hub_snapshot(tiny_ckpt, repo).is_dir(), repo
    assert sum(cfg.emo_num) == 73


def test_gpt_pth_loads_strictly_into_fresh_unified_voice(tiny_ckpt):
    from indextts.gpt.model_v2 import UnifiedVoice
    from indextts.utils.checkpoint import load_checkpoint
    from omegaconf import OmegaConf

    cfg = md.load_config(tiny_ckpt)
    model = UnifiedVoice(**OmegaConf.to_container(cfg.gpt))
    load_checkpoint(model, str(tiny_ckpt / "gpt.pth"))  # upstream's own loader: strict=True
    state = torch.load(tiny_ckpt / "gpt.pth", weights_only=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert model.text_embedding.num_embeddings == cfg.gpt.number_text_tokens + 1
    assert len(model.gpt.h) == cfg.gpt.layers


def test_matrices_and_stats_have_upstream_shapes(tiny_ckpt):
    cfg = md.load_config(tiny_ckpt)
    emo, spk = md.load_emotion_matrices(tiny_ckpt, cfg)
    assert [t.shape for t in emo] == [(n, cfg.gpt.model_dim) for n in cfg.emo_num]
    assert [t.shape for t in spk] == [(n, 192) for n in cfg.emo_num]
    _, mean, std = md.load_semantic_model(tiny_ckpt, cfg)
    assert mean.shape == std.shape == (1024,) and bool((std > 0).all())


def test_feature_models_load_and_agree_on_widths(tiny_ckpt):
    cfg = md.load_config(tiny_ckpt)
    w2v, mean, std = md.load_semantic_model(tiny_ckpt, cfg)
    fe = md.load_feature_extractor(tiny_ckpt)
    audio = 0.1 * torch.randn(1, 16000)
    inputs = fe(audio, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        feat = (w2v(**inputs, output_hidden_states=True).hidden_states[md.W2V_LAYER] - mean) / std
        codes, quantized = md.load_semantic_codec(tiny_ckpt, cfg).quantize(feat)
        style = md.load_campplus(tiny_ckpt)(torch.randn(1, 100, 80))
    assert feat.shape[-1] == 1024 and 45 <= feat.shape[1] <= 55  # 50 frames per second
    assert codes.shape == feat.shape[:2] and int(codes.max()) < 8192
    assert quantized.shape == (1, feat.shape[1], cfg.s2mel.length_regulator.in_channels)
    assert style.shape == (1, 192)


def test_tokenizer_encodes_demo_sentences_without_unk(tiny_ckpt):
    tok = md.load_text_tokenizer(tiny_ckpt)
    for sentence in DEMO_SENTENCES:
        ids = tok.encode(sentence)
        assert ids and tok.unk_token_id not in ids, sentence
        assert max(ids) < md.load_config(tiny_ckpt).gpt.number_text_tokens


def test_missing_hub_model_error_says_what_to_do(tmp_path):
    with pytest.raises(md.ModelDirError, match="facebook/w2v-bert-2.0.*nothing is downloaded"):
        md.resolve_hub_snapshot(tmp_path, md.W2V_BERT_REPO, ("config.json",))


def test_upstream_inference_runs_offline(tiny_ckpt, demo_dir, tmp_path):
    """Upstream IndexTTS2.infer end to end (GPT -> s2mel -> BigVGAN) on the tiny checkpoint, no network."""
    import soundfile as sf

    from indextts_integration.upstream_tts import build_indextts2

    tts = build_indextts2(tiny_ckpt)
    out = tts.infer(str(demo_dir / "demo_000.wav"), "Hello there.", str(tmp_path / "out.wav"),
                    max_mel_tokens=20, num_beams=1, do_sample=False)
    audio, sr = sf.read(out)
    assert sr == 22050 and audio.size > 0
