"""Read audio of any common format, rate and channel count, and resample it the way upstream IndexTTS2 does."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

W2V_SAMPLE_RATE = 16000   # w2v-bert / CAMPPlus input rate
SPK_SAMPLE_RATE = 22050   # upstream loads prompts with librosa.load (default 22050 Hz) before resampling to 16k


class AudioReadError(RuntimeError):
    """The file exists but no reader could decode it."""


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """Mono float32 samples and their rate: soundfile first (wav/flac/ogg/mp3 with libsndfile >= 1.1),
    then torchaudio, then librosa (audioread) for what soundfile's libsndfile cannot decode."""
    errors = []
    try:
        import soundfile as sf

        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
        return data.mean(axis=1), int(sr)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "try the next reader"
        errors.append(f"soundfile: {exc}")
    try:
        import torchaudio

        wav, sr = torchaudio.load(str(path))
        return wav.mean(dim=0).numpy().astype(np.float32), int(sr)
    except Exception as exc:  # noqa: BLE001
        errors.append(f"torchaudio: {exc}")
    try:
        import librosa

        data, sr = librosa.load(str(path), sr=None, mono=True)
        return data.astype(np.float32), int(sr)
    except Exception as exc:  # noqa: BLE001
        errors.append(f"librosa: {exc}")
    raise AudioReadError("; ".join(e.splitlines()[0][:200] for e in errors))


def to_upstream_rates(audio: np.ndarray, sr: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(audio_22k, audio_16k) as [1, n] tensors, resampled as IndexTTS2.infer_generator does for a prompt:
    librosa to 22050 Hz (librosa.load's default soxr_hq), then torchaudio.transforms.Resample to 16 kHz."""
    import librosa
    import torchaudio

    audio_22k = audio if sr == SPK_SAMPLE_RATE else librosa.resample(audio, orig_sr=sr, target_sr=SPK_SAMPLE_RATE)
    audio_22k = torch.from_numpy(np.ascontiguousarray(audio_22k, dtype=np.float32)).unsqueeze(0)
    audio_16k = torchaudio.transforms.Resample(SPK_SAMPLE_RATE, W2V_SAMPLE_RATE)(audio_22k)
    return audio_22k, audio_16k


def level_dbfs(audio: np.ndarray) -> float:
    """RMS level in dB full scale (-inf for digital silence)."""
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if audio.size else 0.0
    return 20.0 * np.log10(rms) if rms > 0 else float("-inf")
