"""Read a transcript file in any of the three accepted forms, detected from its content.

- CSV with a header: a filename column (filename/file/audio/path/wav) and a text column (text/transcript/...).
- LJSpeech metadata: ``id|text[|normalized]`` lines, no header; ``id`` names ``<id>.wav`` (or flac/mp3/ogg).
- JSONL: one ``{"audio": ..., "text": ..., ["speaker": ...]}`` object per line.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg")
FILE_COLUMNS = ("filename", "file", "audio", "audio_path", "path", "wav", "file_name")
TEXT_COLUMNS = ("text", "transcript", "transcription", "sentence", "normalized_text")
DEFAULT_SPEAKER = "speaker"


@dataclass(frozen=True)
class TranscriptRow:
    """One utterance named by a transcript: its id, audio path, text, speaker and where it was read."""

    utt_id: str
    audio: Path
    text: str
    speaker: str
    source_line: int


class TranscriptFormatError(ValueError):
    """The transcript file is in none of the accepted forms."""


def detect_format(text: str, suffix: str = "") -> str:
    """'jsonl', 'ljspeech' or 'csv', from the extension and the first non-empty line."""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if suffix in (".jsonl", ".ndjson") or first.startswith("{"):
        return "jsonl"
    if "|" in first and "," not in first.split("|")[0]:
        return "ljspeech"
    header = [c.strip().lower() for c in next(csv.reader([first]), [])]
    if any(c in FILE_COLUMNS for c in header) and any(c in TEXT_COLUMNS for c in header):
        return "csv"
    raise TranscriptFormatError(
        f"cannot tell the transcript format from its first line {first[:80]!r}. Expected a CSV header with "
        f"one of {FILE_COLUMNS} and one of {TEXT_COLUMNS}, LJSpeech 'id|text[|normalized]' lines, or JSONL "
        '{"audio": ..., "text": ...} lines.')


def resolve_audio(audio_dir: Path, name: str) -> Path:
    """Audio path for a transcript's file name: as given, or with the first existing audio extension added."""
    path = Path(name) if Path(name).is_absolute() else audio_dir / name
    if path.suffix.lower() in AUDIO_EXTENSIONS or path.exists():
        return path
    for ext in AUDIO_EXTENSIONS:
        if path.with_name(path.name + ext).exists():
            return path.with_name(path.name + ext)
    return path.with_name(path.name + ".wav")  # missing: reported by the caller with this name


def utt_id_for(audio_dir: Path, audio: Path) -> str:
    """Stable utterance id: the audio path relative to audio_dir, without extension, '/' made '__'."""
    try:
        rel = audio.relative_to(audio_dir)
    except ValueError:
        rel = Path(audio.name)
    return str(rel.with_suffix("")).replace("/", "__").replace("\\", "__")


def _pick(row: dict, names: tuple[str, ...]) -> str:
    """First non-empty value among the given (case-insensitive) keys of a row."""
    lowered = {str(k).strip().lower(): v for k, v in row.items() if k is not None}
    for name in names:
        if lowered.get(name) not in (None, ""):
            return str(lowered[name])
    return ""


def read_transcripts(path: str | Path, audio_dir: str | Path) -> list[TranscriptRow]:
    """All rows of a transcript file, format auto-detected; text may be empty (judged later)."""
    path, audio_dir = Path(path), Path(audio_dir)
    raw = path.read_text(encoding="utf-8-sig")
    fmt = detect_format(raw, path.suffix.lower())
    entries: list[tuple[int, str, str, str]] = []  # line, file name, text, speaker
    if fmt == "jsonl":
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                obj = json.loads(line)
                entries.append((n, _pick(obj, ("audio",) + FILE_COLUMNS), _pick(obj, TEXT_COLUMNS),
                                _pick(obj, ("speaker", "spk")) or DEFAULT_SPEAKER))
    elif fmt == "ljspeech":
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                parts = line.rstrip("\n").split("|")
                # LJSpeech's third column is the normalised text (numbers spelled out): prefer it when present.
                text = parts[2] if len(parts) > 2 and parts[2].strip() else (parts[1] if len(parts) > 1 else "")
                entries.append((n, parts[0].strip(), text, DEFAULT_SPEAKER))
    else:
        for n, row in enumerate(csv.DictReader(io.StringIO(raw)), 2):
            entries.append((n, _pick(row, FILE_COLUMNS), _pick(row, TEXT_COLUMNS),
                            _pick(row, ("speaker", "spk")) or DEFAULT_SPEAKER))
    rows = []
    for n, name, text, speaker in entries:
        audio = resolve_audio(audio_dir, name.strip()) if name.strip() else audio_dir / f"<line {n}: no file>"
        rows.append(TranscriptRow(utt_id_for(audio_dir, audio), audio, text.strip(), speaker, n))
    return rows
