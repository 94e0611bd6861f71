"""Generate evaluation samples through upstream's own inference path (IndexTTS2.infer), reproducibly.

Every checkpoint speaks the same texts with the same seed per text, so differences between their samples come
from the weights, not from sampling luck.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclasses.dataclass
class TextItem:
    """One text to speak, and optionally its ground-truth recording (for the expected duration)."""
    text: str
    audio: Path | None = None


def read_texts(path: str | os.PathLike) -> list[TextItem]:
    """A texts file: one text a line, or `recording.wav|text` where the recording is that text spoken by the
    target speaker (relative paths are taken from the file's folder). Blank lines and # comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--texts {path}: no such file; write one sentence a line (optionally "
                                "'recording.wav|sentence')")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head, sep, tail = line.partition("|")
        if sep and head.strip().lower().endswith((".wav", ".flac", ".mp3", ".ogg")):
            audio = Path(head.strip())
            audio = audio if audio.is_absolute() else path.parent / audio
            if not audio.is_file():
                raise FileNotFoundError(f"{path}:{n}: recording {audio} not found")
            items.append(TextItem(tail.strip(), audio))
        else:
            items.append(TextItem(line))
    if not items:
        raise ValueError(f"--texts {path}: no texts found (one sentence a line)")
    return items


def seed_everything(seed: int) -> None:
    """Seed every generator upstream's sampling may draw from (python, numpy, torch CPU and accelerators)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def synthesize(tts: Any, text: str, prompt_audio: str | os.PathLike, output: str | os.PathLike, seed: int,
               max_mel_tokens: int = 1500, verbose: bool = False, **generation: Any) -> Path:
    """IndexTTS2.infer(prompt, text) into `output` with the generators seeded; upstream's prints and progress
    bars are hidden unless verbose. `generation`: upstream sampling kwargs (do_sample, num_beams, top_p...)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    sink = contextlib.nullcontext() if verbose else _quiet()
    with sink:
        _encode_prompt_once(tts, str(prompt_audio), output.parent)
        seed_everything(seed)
        result = tts.infer(spk_audio_prompt=str(prompt_audio), text=text, output_path=str(output),
                           max_mel_tokens=max_mel_tokens, verbose=verbose, **generation)
    if result is None or not output.is_file():
        raise RuntimeError(f"IndexTTS2.infer wrote no audio for {text!r} (the text may normalise to nothing); "
                           "remove that line from --texts")
    return output


def _encode_prompt_once(tts: Any, prompt: str, scratch: Path) -> None:
    """Upstream trap: the first infer with a new prompt encodes it (and caches that) while drawing random numbers,
    so a seeded sample would differ between a first and a later call. A throwaway 2-token infer caches it first,
    so every seeded sample takes the cached path."""
    if getattr(tts, "cache_spk_audio_prompt", None) == prompt and getattr(tts, "cache_spk_cond", None) is not None:
        return
    throwaway = scratch / ".prompt_warmup.wav"
    tts.infer(spk_audio_prompt=prompt, text="a.", output_path=str(throwaway), max_mel_tokens=2, num_beams=1,
              do_sample=False)
    throwaway.unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield
