"""Turn a folder of audio + a transcript file into train/val manifests and per-utterance feature files.

Output (``--output-dir``):
- ``features/<id>.pt``: {'codes' int16 [T], 'cond_feat' fp16 [T,1024], 'cond_latent' [32,D], 'emo_vec' [D],
  'meta': {...}} (see features.py); written atomically, reused on re-runs when audio, text and model match.
- ``train_manifest.jsonl`` / ``val_manifest.jsonl``: one JSON row per utterance (fields: see ``_record``), with a
  paired prompt (another utterance of the same speaker) by default, to avoid prompt bleed.
- ``rejects.jsonl``: every skipped utterance with a reason code and detail; one bad file never stops the run.
- ``prepare_summary.json``: counts, reasons, and the config facts the manifests were made for.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from indextts_integration import model_dir as md
from indextts_integration.audio_io import AudioReadError, level_dbfs, read_audio, to_upstream_rates
from indextts_integration.transcripts import TranscriptRow, read_transcripts

CODES_PER_SECOND = 50          # w2v-bert frames (and semantic codes) per second of audio
FEATURES_VERSION = 1


@dataclass
class PrepareOptions:
    """Everything prepare_dataset needs; mirrors scripts/prepare_dataset.py's flags."""

    model_dir: Path
    audio_dir: Path
    transcripts: Path
    output_dir: Path
    val_ratio: float = 0.1
    prompt_mode: str = "paired"        # "paired": prompt = another utterance of the speaker; "self": itself
    seed: int = 0
    device: str = "cpu"
    min_seconds: float = 0.5
    silence_dbfs: float = -60.0        # RMS level below which a file counts as silent
    progress: bool = True


@dataclass
class PrepareSummary:
    """What a run did: accepted rows per split, rejects by reason, reused feature files, seconds taken."""

    train: int = 0
    val: int = 0
    rejected: int = 0
    reused: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


class Reject(Exception):
    """An utterance that cannot be used: ``reason`` is a stable code, ``detail`` says what to do."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def model_fingerprint(model_dir: Path, cfg: Any) -> str:
    """Identity of the models that produced features: gpt.pth/stats sizes+mtimes and the gpt config."""
    from omegaconf import OmegaConf

    parts = [json.dumps(OmegaConf.to_container(cfg.gpt, resolve=True), sort_keys=True)]
    for name in (cfg.gpt_checkpoint, cfg.w2v_stat, cfg.dataset["bpe_model"]):
        st = md.model_file(model_dir, name).stat()
        parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def source_signature(row: TranscriptRow, fingerprint: str) -> dict[str, Any]:
    """What a cached feature file must match to be reused: the audio file, the text and the model."""
    st = row.audio.stat()
    return {"audio": str(row.audio.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "text": row.text,
            "model": fingerprint, "version": FEATURES_VERSION}


def _atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file + rename, so an interrupted run never leaves a half file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _load_cached(path: Path, signature: dict[str, Any]) -> dict[str, Any] | None:
    """The meta of a feature file made from the same source, else None."""
    if not path.is_file():
        return None
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True)["meta"]
    except Exception:  # noqa: BLE001 - a damaged cache file is simply recomputed
        return None
    return meta if meta.get("signature") == signature else None


def _check_audio(row: TranscriptRow, opts: PrepareOptions, max_codes: int) -> tuple[Any, int]:
    """Decode and vet one file; raises Reject (missing/corrupt/empty/too_short/too_long/silent)."""
    if not row.audio.is_file():
        raise Reject("missing", f"{row.audio} does not exist (transcript line {row.source_line})")
    try:
        audio, sr = read_audio(row.audio)
    except AudioReadError as exc:
        raise Reject("corrupt", f"cannot decode {row.audio.name}: {exc}") from None
    if audio.size == 0:
        raise Reject("empty", f"{row.audio.name} holds no samples")
    seconds = audio.size / sr
    if seconds < opts.min_seconds:
        raise Reject("too_short", f"{seconds:.2f} s < --min-seconds {opts.min_seconds}")
    if seconds * CODES_PER_SECOND > max_codes:
        raise Reject("too_long", f"{seconds:.1f} s = ~{int(seconds * CODES_PER_SECOND)} codes > upstream "
                                 f"max_mel_tokens {max_codes} (~{max_codes / CODES_PER_SECOND:.1f} s): split it")
    level = level_dbfs(audio)
    if level < opts.silence_dbfs:
        raise Reject("silent", f"RMS level {level:.1f} dBFS < --silence-dbfs {opts.silence_dbfs}")
    return audio, sr


def _check_text(row: TranscriptRow, featurizer: Any) -> tuple[list[int], int]:
    """Token ids of the transcript; raises Reject (empty/unencodable/too long)."""
    if not row.text:
        raise Reject("empty_transcript", f"transcript line {row.source_line} has no text")
    ids, n_unk = featurizer.text_ids(row.text)
    if not ids or n_unk == len(ids):
        raise Reject("unencodable_transcript", f"{row.text[:60]!r} encodes to no known token with this bpe.model")
    if len(ids) > featurizer.max_text_tokens:
        raise Reject("text_too_long", f"{len(ids)} tokens > max_text_tokens {featurizer.max_text_tokens}")
    return ids, n_unk


def process_row(row: TranscriptRow, featurizer: Any, opts: PrepareOptions, fingerprint: str) -> tuple[dict, bool]:
    """Meta of one accepted utterance (computing and writing its feature file unless cached) and whether it
    was reused; raises Reject for an unusable one."""
    out = opts.output_dir / "features" / f"{row.utt_id}.pt"
    signature = source_signature(row, fingerprint) if row.audio.is_file() else None
    cached = _load_cached(out, signature) if signature else None
    if cached is not None:
        return cached, True
    ids, n_unk = _check_text(row, featurizer)
    audio, sr = _check_audio(row, opts, featurizer.max_mel_tokens)
    _, audio_16k = to_upstream_rates(audio, sr)
    feats = featurizer.audio_features(audio_16k)
    n_codes = int(feats.codes.numel())
    if n_codes > featurizer.max_mel_tokens:
        raise Reject("too_long", f"{n_codes} codes > max_mel_tokens {featurizer.max_mel_tokens}")
    meta = {"signature": signature, "id": row.utt_id, "audio": str(row.audio), "text": row.text,
            "speaker": row.speaker, "text_ids": ids, "n_unk": n_unk, "n_text": len(ids), "n_codes": n_codes,
            "duration": round(audio.size / sr, 4), "orig_sample_rate": sr,
            "features": str(out.relative_to(opts.output_dir))}
    tmp = out.with_name(out.name + ".tmp")
    torch.save({"codes": feats.codes, "cond_feat": feats.cond_feat, "cond_latent": feats.cond_latent,
                "emo_vec": feats.emo_vec, "text_ids": torch.tensor(ids, dtype=torch.int32), "meta": meta}, tmp)
    os.replace(tmp, out)
    return meta, False


def split_ids(ids: list[str], val_ratio: float) -> set[str]:
    """Validation ids, chosen by a hash of the id (stable across re-runs); at least one of each when possible."""
    score = {i: int(hashlib.sha1(i.encode()).hexdigest()[:8], 16) / 0x1_0000_0000 for i in ids}
    val = {i for i in ids if score[i] < val_ratio}
    if val_ratio > 0 and not val and len(ids) >= 2:
        val = {min(ids, key=score.get)}
    if len(val) == len(ids) and ids:
        val.discard(max(ids, key=score.get))
    return val


def assign_prompts(metas: list[dict], val: set[str], mode: str, seed: int) -> None:
    """Add prompt_id / prompt_features / prompt_mode to each row: in 'paired' mode a different utterance of
    the same speaker from the train split (prompt bleed: a self-prompt lets the GPT copy its target)."""
    rng = random.Random(seed)
    by_speaker: dict[str, list[dict]] = {}
    for m in sorted(metas, key=lambda m: m["id"]):
        if m["id"] not in val:
            by_speaker.setdefault(m["speaker"], []).append(m)
    for m in sorted(metas, key=lambda m: m["id"]):
        pool = [p for p in by_speaker.get(m["speaker"], []) if p["id"] != m["id"]] if mode == "paired" else []
        prompt = rng.choice(pool) if pool else m
        m["prompt_id"], m["prompt_features"] = prompt["id"], prompt["features"]
        m["prompt_mode"] = mode if prompt is not m or mode == "self" else "self_fallback"


def _record(meta: dict) -> dict:
    """Manifest row: ids, text, token ids, lengths, feature paths (relative to the output dir), prompt."""
    keys = ("id", "audio", "text", "speaker", "text_ids", "n_text", "n_unk", "n_codes", "duration",
            "orig_sample_rate", "features", "prompt_id", "prompt_features", "prompt_mode")
    return {k: meta[k] for k in keys}


def prepare_dataset(opts: PrepareOptions, featurizer: Any = None) -> PrepareSummary:
    """Run the whole preparation; see the module docstring for what it writes."""
    from tqdm import tqdm

    from indextts_integration.features import Featurizer, describe

    start = time.perf_counter()
    opts.output_dir.mkdir(parents=True, exist_ok=True)
    (opts.output_dir / "features").mkdir(exist_ok=True)
    rows = read_transcripts(opts.transcripts, opts.audio_dir)
    featurizer = featurizer if featurizer is not None else Featurizer(opts.model_dir, opts.device)
    fingerprint = model_fingerprint(opts.model_dir, featurizer.cfg)
    metas, rejects, seen, reused = [], [], set(), 0
    bar = tqdm(rows, desc="prepare", unit="utt", disable=not opts.progress)
    for row in bar:
        try:
            if row.utt_id in seen:
                raise Reject("duplicate", f"{row.audio.name} is named twice (line {row.source_line})")
            seen.add(row.utt_id)
            meta, was_cached = process_row(row, featurizer, opts, fingerprint)
            metas.append(meta)
            reused += was_cached
        except Reject as rej:
            rejects.append({"id": row.utt_id, "audio": str(row.audio), "line": row.source_line,
                            "reason": rej.reason, "detail": rej.detail})
        except Exception as exc:  # noqa: BLE001 - never die on one file; the reject says what happened
            rejects.append({"id": row.utt_id, "audio": str(row.audio), "line": row.source_line,
                            "reason": "error", "detail": f"{type(exc).__name__}: {exc}"})
        bar.set_postfix(ok=len(metas), rejected=len(rejects))
    val = split_ids([m["id"] for m in metas], opts.val_ratio)
    assign_prompts(metas, val, opts.prompt_mode, opts.seed)
    for name, chosen in (("train_manifest.jsonl", [m for m in metas if m["id"] not in val]),
                         ("val_manifest.jsonl", [m for m in metas if m["id"] in val])):
        _atomic_write_text(opts.output_dir / name, "".join(json.dumps(_record(m)) + "\n" for m in chosen))
    _atomic_write_text(opts.output_dir / "rejects.jsonl", "".join(json.dumps(r) + "\n" for r in rejects))
    summary = PrepareSummary(train=len(metas) - len(val), val=len(val), rejected=len(rejects), reused=reused,
                             reasons=dict(Counter(r["reason"] for r in rejects)),
                             seconds=round(time.perf_counter() - start, 2))
    _atomic_write_text(opts.output_dir / "prepare_summary.json", json.dumps(
        {**summary.__dict__, "model_dir": str(opts.model_dir), "model": describe(featurizer.cfg),
         "prompt_mode": opts.prompt_mode, "fingerprint": fingerprint}, indent=2))
    return summary
