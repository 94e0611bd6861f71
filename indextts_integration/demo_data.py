"""Make a small demo voice dataset at run time: real speech from espeak-ng, transcripts as ``filename,text`` CSV.

One fixed espeak-ng voice speaks varied sentences, so the set sounds like one speaker. Without espeak-ng
(install it with ``apt-get install espeak-ng``; scripts/setup_upstream_env.sh does) the audio is generated
tones shaped like syllables, with a loud warning: it exercises the pipeline but is not speech.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np
import soundfile as sf

from indextts_integration.demo_sentences import DEMO_SENTENCES

DEMO_SAMPLE_RATE = 22050  # espeak-ng's native rate, and IndexTTS2's output rate
DEMO_VOICE = "en-us"
TRANSCRIPTS_NAME = "transcripts.csv"


def espeak_binary() -> str | None:
    """Path of espeak-ng (or espeak), None when neither is installed."""
    return shutil.which("espeak-ng") or shutil.which("espeak")


def speak(text: str, path: Path, voice: str = DEMO_VOICE, speed: int = 165, pitch: int = 50) -> None:
    """Synthesize ``text`` with espeak-ng into a mono 16-bit wav at DEMO_SAMPLE_RATE."""
    exe = espeak_binary()
    if exe is None:
        raise FileNotFoundError("espeak-ng is not installed: apt-get install espeak-ng")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(raw), text],
                       check=True, capture_output=True, timeout=60)
        audio, sr = sf.read(raw, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if sr != DEMO_SAMPLE_RATE:
        import librosa

        audio = librosa.resample(audio, orig_sr=sr, target_sr=DEMO_SAMPLE_RATE)
    sf.write(path, audio, DEMO_SAMPLE_RATE, subtype="PCM_16")


def synth_fallback(text: str, path: Path, seed: int) -> None:
    """Syllable-like harmonic tones (one per word), used only when espeak-ng is missing."""
    rng = np.random.default_rng(seed)
    sr, pieces = DEMO_SAMPLE_RATE, []
    for word in text.split():
        dur = 0.12 + 0.05 * len(word) ** 0.5
        t = np.arange(int(sr * dur)) / sr
        f0 = 110 + 30 * rng.standard_normal()
        tone = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
        pieces += [0.2 * tone * np.hanning(len(t)), np.zeros(int(sr * 0.05))]
    sf.write(path, np.concatenate(pieces).astype(np.float32), sr, subtype="PCM_16")


def make_demo_dataset(output_dir: str | Path, n_utterances: int = 12, voice: str = DEMO_VOICE) -> Path:
    """Write ``n_utterances`` wavs + ``transcripts.csv`` into output_dir; returns the CSV path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    use_espeak = espeak_binary() is not None
    if not use_espeak:
        warnings.warn("espeak-ng not found: the demo dataset is GENERATED TONES, not speech. "
                      "Install it (apt-get install espeak-ng) for a real voice.", RuntimeWarning, stacklevel=2)
    rows = []
    for i in range(n_utterances):
        text = DEMO_SENTENCES[i % len(DEMO_SENTENCES)]
        name = f"demo_{i:03d}.wav"
        if use_espeak:
            speak(text, out / name, voice=voice, speed=150 + 7 * (i % 5))  # varied pace, same voice
        else:
            synth_fallback(text, out / name, seed=i)
        rows.append((name, text))
    csv_path = out / TRANSCRIPTS_NAME
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "text"])
        writer.writerows(rows)
    return csv_path


def main(argv: list[str] | None = None) -> int:
    """CLI: python -m indextts_integration.demo_data --output-dir DIR [--n 12]."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", required=True, help="folder for the wavs and transcripts.csv")
    parser.add_argument("--n", type=int, default=12, help="number of utterances (default 12)")
    parser.add_argument("--voice", default=DEMO_VOICE, help=f"espeak-ng voice (default {DEMO_VOICE})")
    args = parser.parse_args(argv)
    print(f"demo dataset: {make_demo_dataset(args.output_dir, args.n, args.voice)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
