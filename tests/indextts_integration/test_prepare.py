"""prepare_dataset (indextts_integration/prepare.py, scripts/prepare_dataset.py) over a folder that mixes good
files with broken ones: it finishes, keeps the good ones, lists each bad one with its reason, and resumes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from indextts_integration.prepare import PrepareOptions, prepare_dataset
from indextts_integration.transcripts import TranscriptFormatError, detect_format, read_transcripts

pytestmark = pytest.mark.upstream

REPO = Path(__file__).resolve().parents[2]
GOOD = ["demo_000", "demo_001", "demo_002", "demo_003"]
# file stem -> the reason prepare must give for it
BAD = {"corrupt": "corrupt", "no_samples": "empty", "silent": "silent", "forty_seconds": "too_long",
       "missing": "missing", "no_text": "empty_transcript"}
STEREO = "stereo_44k"  # a good utterance re-encoded as 44.1 kHz stereo: accepted and resampled


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def mixed(demo_dir, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """An audio folder with good and broken files, and {stem: text} for a transcript in any form."""
    import librosa

    audio = tmp_path_factory.mktemp("mixed")
    texts = {}
    demo_texts = {Path(r["filename"]).stem: r["text"] for r in _csv_rows(demo_dir / "transcripts.csv")}
    for stem in GOOD:
        shutil.copy(demo_dir / f"{stem}.wav", audio / f"{stem}.wav")
        texts[stem] = demo_texts[stem]
    speech, sr = sf.read(demo_dir / "demo_004.wav", dtype="float32")
    stereo = librosa.resample(speech, orig_sr=sr, target_sr=44100)
    sf.write(audio / f"{STEREO}.wav", np.stack([stereo, 0.5 * stereo], axis=1), 44100)
    texts[STEREO] = demo_texts["demo_004"]
    (audio / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + os.urandom(3000))
    sf.write(audio / "no_samples.wav", np.zeros(0, dtype=np.float32), 22050)
    sf.write(audio / "silent.wav", np.zeros(2 * 22050, dtype=np.float32), 22050)
    sf.write(audio / "forty_seconds.wav", np.tile(speech, int(40 * sr / len(speech)) + 1)[:40 * sr], sr)
    shutil.copy(demo_dir / "demo_005.wav", audio / "no_text.wav")
    texts.update({"corrupt": "Corrupt file.", "no_samples": "No samples.", "silent": "Silence here.",
                  "forty_seconds": "A very long recording.", "missing": "This file is not there.", "no_text": ""})
    return audio, texts


def _csv_rows(path: Path) -> list[dict]:
    import csv

    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _write_transcripts(folder: Path, texts: dict[str, str], form: str) -> Path:
    if form == "csv":
        path = folder / "transcripts.csv"
        path.write_text("filename,text\n" + "".join(f'{s}.wav,"{t}"\n' for s, t in texts.items()))
    elif form == "ljspeech":
        path = folder / "metadata.csv"
        path.write_text("".join(f"{s}|{t}|{t}\n" for s, t in texts.items()))
    else:
        path = folder / "transcripts.jsonl"
        path.write_text("".join(json.dumps({"audio": f"{s}.wav", "text": t}) + "\n" for s, t in texts.items()))
    return path


def test_the_three_transcript_forms_are_detected_and_read_alike(mixed, tmp_path):
    audio, texts = mixed
    read = {}
    for form in ("csv", "ljspeech", "jsonl"):
        path = _write_transcripts(tmp_path, texts, form)
        assert detect_format(path.read_text(), path.suffix) == form
        read[form] = [(r.utt_id, r.audio, r.text) for r in read_transcripts(path, audio)]
    assert read["csv"] == read["ljspeech"] == read["jsonl"]
    assert [r[0] for r in read["csv"]] == list(texts)
    assert read["csv"][0][1] == audio / "demo_000.wav"
    (tmp_path / "odd.txt").write_text("just some words\n")
    with pytest.raises(TranscriptFormatError, match="filename.*id\\|text.*JSONL"):
        read_transcripts(tmp_path / "odd.txt", audio)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_dataset.py"), *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_mixed_folder_through_the_cli_then_resume(tiny_ckpt, mixed, demo_dir, tmp_path):
    audio, texts = mixed
    transcripts = _write_transcripts(tmp_path, texts, "csv")
    out = tmp_path / "prepared"
    args = ["--model-dir", str(tiny_ckpt), "--audio-dir", str(audio), "--transcripts", str(transcripts),
            "--output-dir", str(out), "--val-ratio", "0.2", "--device", "cpu", "--no-progress"]
    first = _run_cli(*args)
    assert first.returncode == 0, first.stdout + first.stderr[-4000:]
    assert "train 3, val 2, rejected 6" in first.stdout and "reused 0 cached" in first.stdout

    rows = _jsonl(out / "train_manifest.jsonl") + _jsonl(out / "val_manifest.jsonl")
    assert sorted(r["id"] for r in rows) == sorted(GOOD + [STEREO])
    rejects = {Path(r["audio"]).stem: r for r in _jsonl(out / "rejects.jsonl")}
    assert {stem: r["reason"] for stem, r in rejects.items()} == BAD
    assert all(r["detail"] for r in rejects.values())
    assert "36.3 s" in rejects["forty_seconds"]["detail"]  # says the limit, so the user can split the file

    by_id = {r["id"]: r for r in rows}
    stereo, mono = by_id[STEREO], _mono_twin(demo_dir / "demo_004.wav", tmp_path / "twin", tiny_ckpt)
    assert stereo["orig_sample_rate"] == 44100
    assert abs(stereo["n_codes"] - mono["n_codes"]) <= 1  # resampled to upstream's rates like the original
    for r in rows:
        assert (out / r["features"]).is_file() and (out / r["prompt_features"]).is_file()
        assert r["prompt_id"] != r["id"] and r["prompt_mode"] == "paired"  # no prompt bleed

    second = _run_cli(*args)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "train 3, val 2, rejected 6" in second.stdout and "reused 5 cached" in second.stdout
    assert _jsonl(out / "train_manifest.jsonl") + _jsonl(out / "val_manifest.jsonl") == rows


def _mono_twin(wav: Path, folder: Path, tiny_ckpt: Path) -> dict:
    """The manifest row of the same utterance prepared from its original 22.05 kHz mono file."""
    folder.mkdir()
    shutil.copy(wav, folder / wav.name)
    (folder / "t.csv").write_text(f"filename,text\n{wav.name},Hello.\n")
    prepare_dataset(PrepareOptions(model_dir=tiny_ckpt, audio_dir=folder, transcripts=folder / "t.csv",
                                   output_dir=folder / "out", val_ratio=0.0, progress=False))
    return _jsonl(folder / "out" / "train_manifest.jsonl")[0]


def test_other_forms_reuse_the_same_features_and_a_bad_transcript_file_stops_early(tiny_ckpt, mixed, tmp_path):
    audio, texts = mixed
    out = tmp_path / "prepared"
    summaries = []
    for form in ("ljspeech", "jsonl"):
        s = prepare_dataset(PrepareOptions(model_dir=tiny_ckpt, audio_dir=audio, output_dir=out, progress=False,
                                           transcripts=_write_transcripts(tmp_path, texts, form), val_ratio=0.2))
        summaries.append(s)
    assert (summaries[0].train, summaries[0].val, summaries[0].rejected, summaries[0].reused) == (3, 2, 6, 0)
    assert summaries[0].reasons == {reason: 1 for reason in BAD.values()}
    assert summaries[1].reused == 5  # same audio + text + model: the JSONL run computed nothing again
    summary = json.loads((out / "prepare_summary.json").read_text())
    assert summary["rejected"] == 6 and summary["prompt_mode"] == "paired"
