"""Speaker similarity: cosine of CAMPPlus embeddings, the speaker encoder IndexTTS2 ships (192-d style vectors).

Features are made the way upstream IndexTTS2 makes CAMPPlus input for a prompt: audio read at 22050 Hz
(librosa), resampled to 16 kHz (torchaudio), 80-bin kaldi fbank without dither, minus its mean over time.
Mean normalisation removes a constant log-gain, so the score ignores loudness.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from indextts_integration.audio_io import W2V_SAMPLE_RATE, read_audio, to_upstream_rates

FBANK_BINS = 80
MIN_SECONDS = 0.05  # a few 25 ms fbank frames; below this CAMPPlus has nothing to pool


def campplus_features(audio_16k: torch.Tensor) -> torch.Tensor:
    """[frames, 80] mean-normalised kaldi fbank of a [1, n] 16 kHz waveform (upstream's CAMPPlus input)."""
    import torchaudio

    if audio_16k.shape[-1] < MIN_SECONDS * W2V_SAMPLE_RATE:
        raise ValueError(f"audio of {audio_16k.shape[-1] / W2V_SAMPLE_RATE:.3f} s is too short for a speaker "
                         f"embedding (need >= {MIN_SECONDS} s); check the file is not empty or silent-trimmed")
    feat = torchaudio.compliance.kaldi.fbank(audio_16k.float(), num_mel_bins=FBANK_BINS, dither=0,
                                             sample_frequency=W2V_SAMPLE_RATE)
    return feat - feat.mean(dim=0, keepdim=True)


def audio_16k(source: str | os.PathLike | tuple[np.ndarray, int]) -> torch.Tensor:
    """[1, n] 16 kHz waveform from a file or (samples, rate), resampled via 22050 Hz as upstream does."""
    audio, sr = read_audio(Path(source)) if isinstance(source, (str, os.PathLike)) else source
    return to_upstream_rates(np.asarray(audio, dtype=np.float32), int(sr))[1]


@torch.no_grad()
def speaker_embedding(campplus: nn.Module, source: str | os.PathLike | tuple[np.ndarray, int]) -> torch.Tensor:
    """The 192-d CAMPPlus embedding of an audio file or (samples, rate), as a float32 CPU vector."""
    device = next(campplus.parameters()).device
    feat = campplus_features(audio_16k(source)).to(device)
    return campplus(feat.unsqueeze(0))[0].float().cpu()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two embeddings, computed in float64."""
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


class SpeakerScorer:
    """Scores audio against one target speaker; the target's embedding (mean over its files) is computed once."""

    def __init__(self, campplus: nn.Module, target_audio: str | os.PathLike | list[str | os.PathLike]) -> None:
        self.campplus = campplus.eval()
        files = target_audio if isinstance(target_audio, list) else [target_audio]
        self.target = torch.stack([speaker_embedding(campplus, f) for f in files]).mean(dim=0)

    def similarity(self, audio: str | os.PathLike | tuple[np.ndarray, int]) -> float:
        """Cosine of `audio`'s embedding with the target speaker's (1 = same embedding)."""
        return cosine(speaker_embedding(self.campplus, audio), self.target)


def speaker_similarity(campplus: nn.Module, a: str | os.PathLike | tuple[np.ndarray, int],
                       b: str | os.PathLike | tuple[np.ndarray, int]) -> float:
    """Cosine of the CAMPPlus embeddings of two audios."""
    return cosine(speaker_embedding(campplus, a), speaker_embedding(campplus, b))
