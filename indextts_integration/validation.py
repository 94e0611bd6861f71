"""Validate voice adapters against their base: check every file, make samples through upstream's inference
path for the base and each adapter (same texts, same seeds), score them, and write a report.

A refused adapter (corrupt, wrong base, NaN, ...) is a report row with its reason; the run goes on.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from indextts_integration.adapter_checks import AdapterCheck, check_adapter_file, collect_adapter_files, training_info
from indextts_integration.synthesis import TextItem, read_texts, synthesize

BASE_LABEL = "base"
RESULTS_FILE = "results.json"


@dataclasses.dataclass
class ValidationOptions:
    model_dir: str
    adapters: list[str]
    reference_audio: str
    texts: str
    output_dir: str
    prompt_audio: str | None = None      # speaker prompt for generation; default: reference_audio
    reference_text: str | None = None    # transcript of reference_audio: gives the speaking rate for durations
    val_manifest: str | None = None      # prepared val_manifest.jsonl: loss / mel accuracy / perplexity
    asr_model: str | None = None         # local ASR model folder for WER (never downloaded)
    device: str = "cpu"
    seed: int = 1234
    max_mel_tokens: int = 1500           # upstream's default
    num_beams: int = 3                   # upstream's default
    do_sample: bool = True               # upstream's default
    include_base: bool = True
    verbose: bool = False


def run_validation(opts: ValidationOptions) -> dict[str, Any]:
    """Run the whole validation and write samples/, figures/, results.json, report.md and report.html."""
    from indextts_integration.deploy import load_adapters, set_voice_blend
    from indextts_integration.report import write_report
    from indextts_integration.upstream_tts import build_indextts2

    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = read_texts(opts.texts)
    files = collect_adapter_files(opts.adapters)
    for path in [opts.reference_audio, opts.prompt_audio]:
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{path}: audio file not found (--reference-audio / --prompt-audio)")

    _say(f"building IndexTTS2 from {opts.model_dir} on {opts.device}")
    tts = build_indextts2(opts.model_dir, device=opts.device)
    checks = [check_adapter_file(tts.gpt, path, label) for path, label in files]
    names: dict[str, str] = {}
    for check in checks:
        if check.ok:
            try:
                names[check.label] = next(iter(load_adapters(tts.gpt, [(check.path, 1.0)])))
            except Exception as e:  # noqa: BLE001 - anything the loader refuses is reported, not fatal
                check.reason = f"{type(e).__name__}: {e}"
        _say(f"{check.label}: {'ok' if check.ok else 'REFUSED: ' + str(check.reason)}")

    scorer = _make_scorer(tts, opts)
    runs = ([(BASE_LABEL, None)] if opts.include_base else []) + [(c.label, c) for c in checks if c.ok]
    checkpoints = []
    for label, check in runs:
        set_voice_blend(tts, {} if check is None else {names[label]: 1.0})
        checkpoints.append(_evaluate_checkpoint(tts, label, check, texts, scorer, opts, out))
    results = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {k: v for k, v in dataclasses.asdict(opts).items() if k != "verbose"},
        "texts": [{"text": t.text, "audio": str(t.audio) if t.audio else None} for t in texts],
        "checks": [{**dataclasses.asdict(c), "ok": c.ok} for c in checks],
        "checkpoints": checkpoints,
    }
    write_report(results, out)
    return results


def _make_scorer(tts: Any, opts: ValidationOptions):
    from indextts_integration.sample_scoring import SampleScorer
    from indextts_integration.wer import load_local_asr

    transcribe = load_local_asr(opts.asr_model, opts.device) if opts.asr_model else None
    return SampleScorer(tts.campplus_model, opts.reference_audio, opts.reference_text, transcribe)


def _evaluate_checkpoint(tts: Any, label: str, check: AdapterCheck | None, texts: list[TextItem], scorer: Any,
                         opts: ValidationOptions, out: Path) -> dict[str, Any]:
    """Samples + per-sample scores + their means (+ manifest metrics) for the voice currently set on `tts`."""
    from indextts_integration.evaluate import manifest_metrics

    t0 = time.perf_counter()
    samples = []
    for i, item in enumerate(texts):
        wav = out / "samples" / _safe(label) / f"{i:02d}.wav"
        synthesize(tts, item.text, opts.prompt_audio or opts.reference_audio, wav, seed=opts.seed + i,
                   max_mel_tokens=opts.max_mel_tokens, verbose=opts.verbose, num_beams=opts.num_beams,
                   do_sample=opts.do_sample)
        samples.append({"index": i, "text": item.text, "path": wav.relative_to(out).as_posix(),
                        **scorer.score(wav, item)})
    metrics = {key: _mean([s.get(key) for s in samples])
               for key in ("speaker_similarity", "duration_ratio", "wer", "seconds")}
    if opts.val_manifest:
        m = manifest_metrics(tts.gpt, opts.val_manifest)
        metrics.update(val_loss=m["val_loss"], mel_accuracy=m["mel_accuracy"], mel_perplexity=m["mel_perplexity"])
    _say(f"{label}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None)
         + f" ({time.perf_counter() - t0:.1f} s)")
    return {"label": label, "path": check.path if check else None, "adapter": check.adapter if check else None,
            "metrics": metrics, "samples": samples,
            "training": training_info(check.path) if check else None}


def _mean(values: list[Any]) -> float | None:
    nums = [float(v) for v in values if v is not None]
    return float(np.mean(nums)) if nums else None


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.@" else "_" for ch in label)


def _say(msg: str) -> None:
    print(f"[validate] {msg}", file=sys.stderr, flush=True)


def load_results(output_dir: str | os.PathLike) -> dict[str, Any]:
    """results.json of an earlier run (e.g. to rebuild its report with report.write_report)."""
    return json.loads((Path(output_dir) / RESULTS_FILE).read_text(encoding="utf-8"))
