"""Word error rate of generated speech, with an ASR model the user already has on disk (never downloaded).

`--asr-model DIR` is a local Hugging Face speech-recognition model folder (e.g. a Whisper or wav2vec2-CTC
checkout); it is opened with transformers' pipeline and local_files_only, so nothing is fetched.
"""
from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path
from typing import Any, Callable

import numpy as np


def normalize_words(text: str) -> list[str]:
    """Lower-case words with punctuation removed (apostrophes inside words kept), for a fair WER."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w\s']", " ", text)
    return [w.strip("'") for w in text.split() if w.strip("'")]


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance over words (substitutions, deletions and insertions each cost 1)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(S + D + I) / words in the reference, after normalize_words; can exceed 1 with many insertions."""
    ref, hyp = normalize_words(reference), normalize_words(hypothesis)
    if not ref:
        raise ValueError(f"the reference text {reference!r} has no words to score against")
    return edit_distance(ref, hyp) / len(ref)


def load_local_asr(model_path: str | os.PathLike, device: str = "cpu") -> Callable[[np.ndarray, int], str]:
    """A transcribe(samples, rate) -> text function over a local ASR model folder; refuses anything not local."""
    path = Path(model_path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"--asr-model {path}: expected a local model folder with config.json (a Hugging "
                                "Face speech-recognition checkout, e.g. openai/whisper-small saved with "
                                "save_pretrained). Nothing is downloaded; leave --asr-model out to skip WER.")
    from transformers import pipeline

    asr: Any = pipeline("automatic-speech-recognition", model=str(path), device=device,
                        model_kwargs={"local_files_only": True})

    def transcribe(samples: np.ndarray, rate: int) -> str:
        return str(asr({"raw": np.asarray(samples, dtype=np.float32), "sampling_rate": int(rate)})["text"])

    return transcribe
