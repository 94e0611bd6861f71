"""Duration of generated speech against what is expected for its text.

The expected duration of a text is the duration of its ground-truth recording when there is one, else the
text's length in characters at the reference speaker's rate (seconds per character of a transcribed reference).
A ratio near 1 means natural pace; far above 1 often means the GPT never emitted its stop token.
"""
from __future__ import annotations

import os

import soundfile as sf


def audio_seconds(path: str | os.PathLike) -> float:
    """Length of an audio file in seconds, from its header (the samples are not read)."""
    info = sf.info(str(path))
    return info.frames / float(info.samplerate)


def spoken_chars(text: str) -> int:
    """Characters that take time to say: letters and digits (also CJK), not spaces or punctuation."""
    return sum(ch.isalnum() for ch in text)


def seconds_per_char(reference_seconds: float, reference_text: str) -> float:
    """Speaking rate of a reference recording whose transcript is known."""
    n = spoken_chars(reference_text)
    if n == 0 or reference_seconds <= 0:
        raise ValueError(f"cannot take a speaking rate from {reference_seconds:.2f} s of audio and the text "
                         f"{reference_text!r}: give --reference-text with the words spoken in --reference-audio")
    return reference_seconds / n


def expected_seconds(text: str, rate_s_per_char: float) -> float:
    """How long `text` takes at a speaking rate (seconds per spoken character)."""
    return spoken_chars(text) * rate_s_per_char


def duration_ratio(generated_seconds: float, expected: float) -> float:
    """generated / expected duration; raises on a non-positive expectation."""
    if expected <= 0:
        raise ValueError(f"expected duration must be > 0 s, got {expected}")
    return generated_seconds / expected
