"""indextts_integration/speaker_similarity.py with the model dir's real-class CAMPPlus: identical audio scores 1,
different voices and signals score lower, and the embedding is exactly the style upstream's infer computes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from indextts_integration import model_dir as md
from indextts_integration.demo_data import espeak_binary, speak
from indextts_integration.speaker_similarity import (SpeakerScorer, campplus_features, cosine, speaker_embedding,
                                                     speaker_similarity)

pytestmark = pytest.mark.upstream
SR = 22050


@pytest.fixture(scope="module")
def campplus(tiny_ckpt):
    return md.load_campplus(tiny_ckpt)


@pytest.fixture(scope="module")
def voices(tmp_path_factory):
    """The same sentence from two espeak-ng voices, and another sentence from the first voice."""
    assert espeak_binary(), "espeak-ng is part of the upstream tier (scripts/setup_upstream_env.sh installs it)"
    out = tmp_path_factory.mktemp("voices")
    text = "The quick brown fox jumps over the lazy dog."
    speak(text, out / "us.wav", voice="en-us")
    speak(text, out / "scot.wav", voice="en-gb-scotland")
    speak("She sells sea shells by the sea shore.", out / "us_other.wav", voice="en-us")
    return out


def test_identical_audio_scores_one(campplus, voices):
    assert speaker_similarity(campplus, voices / "us.wav", voices / "us.wav") == pytest.approx(1.0, abs=1e-5)
    scorer = SpeakerScorer(campplus, voices / "us.wav")
    assert scorer.similarity(voices / "us.wav") == pytest.approx(1.0, abs=1e-5)


def test_different_voices_and_signals_score_lower(campplus, voices):
    # Random tiny weights squeeze every embedding into a narrow cone, so the gaps are small but real.
    other_voice = speaker_similarity(campplus, voices / "us.wav", voices / "scot.wav")
    other_text = speaker_similarity(campplus, voices / "us.wav", voices / "us_other.wav")
    assert other_voice < 1 - 1e-4 and other_text < 1 - 1e-4
    t = np.arange(SR) / SR
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    noise = (0.1 * np.random.default_rng(0).standard_normal(SR)).astype(np.float32)
    assert speaker_similarity(campplus, (tone, SR), (noise, SR)) < 0.99


def test_features_are_mean_normalised_80_bin_fbank(voices):
    from indextts_integration.speaker_similarity import audio_16k

    feat = campplus_features(audio_16k(voices / "us.wav"))
    assert feat.shape[1] == 80 and feat.shape[0] > 100
    assert feat.mean(dim=0).abs().max() < 1e-4 and feat.std() > 0.5


def test_embedding_equals_the_style_upstream_infer_computes(tiny_ckpt, voices, tmp_path):
    """Upstream keeps the prompt's CAMPPlus style in cache_s2mel_style: ours must be the same vector."""
    from indextts_integration.synthesis import synthesize
    from indextts_integration.upstream_tts import build_indextts2

    tts = build_indextts2(tiny_ckpt)
    synthesize(tts, "Hello.", voices / "scot.wav", tmp_path / "o.wav", seed=0, max_mel_tokens=10, num_beams=1)
    ours = speaker_embedding(tts.campplus_model, voices / "scot.wav")
    upstream = tts.cache_s2mel_style.detach()[0].float()
    assert torch.allclose(ours, upstream, atol=1e-6, rtol=0)
    assert cosine(ours, upstream) == pytest.approx(1.0, abs=1e-6) and ours.abs().max() > 0


def test_too_short_audio_is_refused_with_advice(campplus):
    with pytest.raises(ValueError, match="too short"):
        speaker_similarity(campplus, (np.zeros(200, np.float32), SR), (np.zeros(SR, np.float32), SR))
