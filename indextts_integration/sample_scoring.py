"""Objective scores of one generated sample: speaker similarity to the target speaker, duration against the
expected one, and WER when the user has a local ASR model."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch import nn

from indextts_integration.audio_io import read_audio
from indextts_integration.duration import audio_seconds, duration_ratio, expected_seconds, seconds_per_char
from indextts_integration.speaker_similarity import SpeakerScorer
from indextts_integration.synthesis import TextItem
from indextts_integration.wer import word_error_rate


class SampleScorer:
    """Holds what is fixed across samples (target speaker embedding, speaking rate, ASR) and scores each one."""

    def __init__(self, campplus: nn.Module, reference_audio: str | os.PathLike, reference_text: str | None = None,
                 transcribe: Callable[[np.ndarray, int], str] | None = None) -> None:
        self.speaker = SpeakerScorer(campplus, reference_audio)
        self.rate = seconds_per_char(audio_seconds(reference_audio), reference_text) if reference_text else None
        self.transcribe = transcribe

    def expected(self, item: TextItem) -> float | None:
        """Seconds the text should take: its recording's length, else the reference speaker's rate, else None."""
        if item.audio is not None:
            return audio_seconds(item.audio)
        return expected_seconds(item.text, self.rate) if self.rate is not None else None

    def score(self, wav: str | os.PathLike, item: TextItem) -> dict[str, Any]:
        """{seconds, speaker_similarity, duration_ratio (None without an expectation), wer, transcript}."""
        samples, sr = read_audio(Path(wav))
        seconds = len(samples) / sr
        expected = self.expected(item)
        out: dict[str, Any] = {"seconds": seconds, "speaker_similarity": self.speaker.similarity((samples, sr)),
                               "duration_ratio": duration_ratio(seconds, expected) if expected else None}
        if self.transcribe is not None:
            transcript = self.transcribe(samples, sr)
            out.update(transcript=transcript, wer=word_error_rate(item.text, transcript))
        return out
