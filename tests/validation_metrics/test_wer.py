"""indextts_integration/wer.py: word error rate on known inputs; the ASR loader refuses anything not local."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from indextts_integration.wer import edit_distance, load_local_asr, normalize_words, word_error_rate


@pytest.mark.parametrize("ref,hyp,expected", [
    ("the cat sat on the mat", "the cat sat on the mat", 0.0),
    ("the cat sat on the mat", "the cat sat on a mat", 1 / 6),        # one substitution
    ("the cat sat on the mat", "the cat on the mat", 1 / 6),          # one deletion
    ("the cat sat on the mat", "the fat cat sat on the mat", 1 / 6),  # one insertion
    ("hello world", "", 1.0),                                         # everything deleted
    ("hi", "oh hi there you", 3.0),                                   # insertions can exceed 1
    ("Hello, World!", "hello world", 0.0),                            # case and punctuation do not count
    ("It's fine.", "it's fine", 0.0),
])
def test_wer_known_values(ref, hyp, expected):
    assert word_error_rate(ref, hyp) == pytest.approx(expected)


def test_normalize_keeps_inner_apostrophes_only():
    assert normalize_words("'Quoted' don't — STOP.") == ["quoted", "don't", "stop"]


words = st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=8)


@given(words, words, words)
def test_edit_distance_is_a_metric(a, b, c):
    assert edit_distance(a, a) == 0
    assert edit_distance(a, b) == edit_distance(b, a)
    assert edit_distance(a, c) <= edit_distance(a, b) + edit_distance(b, c)
    assert abs(len(a) - len(b)) <= edit_distance(a, b) <= max(len(a), len(b))


def test_empty_reference_is_refused():
    with pytest.raises(ValueError, match="no words"):
        word_error_rate(" ,.", "anything")


def test_asr_model_must_be_a_local_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        load_local_asr("openai/whisper-small")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_local_asr(tmp_path)
