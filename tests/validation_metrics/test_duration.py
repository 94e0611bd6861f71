"""indextts_integration/duration.py on exact synthetic lengths (core tier: needs no upstream)."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from indextts_integration.duration import (audio_seconds, duration_ratio, expected_seconds, seconds_per_char,
                                           spoken_chars)


@pytest.mark.parametrize("frames,rate", [(22050, 22050), (12345, 16000), (1, 44100), (66150, 22050)])
def test_audio_seconds_is_frames_over_rate(tmp_path, frames, rate):
    path = tmp_path / "a.wav"
    sf.write(path, np.zeros(frames, dtype=np.float32), rate)
    assert audio_seconds(path) == frames / rate


def test_duration_ratio_exact_on_synthetic_lengths(tmp_path):
    gen, ref = tmp_path / "gen.wav", tmp_path / "ref.wav"
    sf.write(gen, np.zeros(33075, dtype=np.float32), 22050)  # 1.5 s
    sf.write(ref, np.zeros(16000, dtype=np.float32), 16000)  # 1.0 s
    assert duration_ratio(audio_seconds(gen), audio_seconds(ref)) == 1.5
    assert duration_ratio(2.0, 4.0) == 0.5


def test_speaking_rate_counts_only_spoken_characters():
    assert spoken_chars("Hi, there!  OK?") == 9
    assert spoken_chars("你好，世界") == 4
    rate = seconds_per_char(3.0, "one two three")  # 11 spoken characters
    assert rate == pytest.approx(3.0 / 11)
    assert expected_seconds("four five", rate) == pytest.approx(8 * 3.0 / 11)


def test_bad_inputs_say_what_to_do():
    with pytest.raises(ValueError, match="--reference-text"):
        seconds_per_char(2.0, "...")
    with pytest.raises(ValueError, match="must be > 0"):
        duration_ratio(1.0, 0.0)
