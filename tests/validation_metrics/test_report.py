"""indextts_integration/report.py + report_plots.py on a synthetic results document (core tier: no upstream).

The upstream tier (tests/indextts_integration/test_validate.py) runs the same report on real validation output.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import soundfile as sf

from indextts_integration.adapter_checks import AdapterCheck
from indextts_integration.report import BEST, SECTIONS, best_labels, write_report
from indextts_integration.report_plots import N_MELS, log_mel, mel_filterbank
from lora_engine.training.metrics import MetricsLog

SR = 22050
PNG = b"\x89PNG\r\n\x1a\n"


def _sine(path, freq, seconds=0.5):
    t = np.arange(int(SR * seconds)) / SR
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), SR)


def _results(tmp_path):
    """base + two adapters (one from a run folder with metrics.jsonl) + one refused file, two texts."""
    run = tmp_path / "runs" / "alice"
    run.mkdir(parents=True)
    log = MetricsLog(run, tensorboard=False)
    for step in range(1, 11):
        log.log({"step": step, "loss": 5.0 - 0.3 * step, "lr": 1e-3})
        if step % 5 == 0:
            log.log({"step": step, "loss": 5.0 - 0.3 * step, "lr": 1e-3, "val_loss": 4.0 - 0.2 * step,
                     "speaker_similarity": 0.5 + 0.02 * step})
    log.close()
    checks = [AdapterCheck(str(run / "adapter.safetensors"), "alice/adapter", adapter="alice", ranks=[4], alpha=8,
                           targets=10, lora_params=1000, trained_steps=10),
              AdapterCheck(str(tmp_path / "bob.safetensors"), "bob", adapter="bob", ranks=[8], alpha=16, targets=4,
                           lora_params=2000),
              AdapterCheck(str(tmp_path / "bad.safetensors"), "bad", reason="bad.safetensors: base fingerprint "
                           "mismatch on 1 of 10 targeted modules")]
    metrics = {"base": (0.60, 1.40, 3.0), "alice/adapter": (0.91, 1.05, 2.0), "bob": (0.75, 0.98, 2.5)}
    cps = []
    for k, (label, (sim, ratio, loss)) in enumerate(metrics.items()):
        samples = []
        for i, text in enumerate(["Hello there.", "A | pipe and <b>tag</b>."]):
            wav = tmp_path / "samples" / label.replace("/", "_") / f"{i:02d}.wav"
            wav.parent.mkdir(parents=True, exist_ok=True)
            _sine(wav, 220 * (k + 1) + 50 * i)
            samples.append({"index": i, "text": text, "path": wav.relative_to(tmp_path).as_posix(), "seconds": 0.5,
                            "speaker_similarity": sim, "duration_ratio": ratio})
        training = {"run_dir": str(run), "metrics": str(run / "metrics.jsonl"), "step": None} if k == 1 else None
        cps.append({"label": label, "path": None, "adapter": None, "samples": samples, "training": training,
                    "metrics": {"speaker_similarity": sim, "duration_ratio": ratio, "wer": None, "seconds": 0.5,
                                "val_loss": loss, "mel_accuracy": 1 / loss, "mel_perplexity": np.exp(loss)}})
    return {"created": "2026-01-01T00:00:00+00:00", "settings": {"model_dir": "ckpt", "seed": 1},
            "texts": [{"text": "Hello there.", "audio": None}, {"text": "A | pipe and <b>tag</b>.", "audio": None}],
            "checks": [{**dataclasses.asdict(c), "ok": c.ok} for c in checks], "checkpoints": cps}


def test_best_is_marked_per_metric_direction():
    cps = [{"label": "a", "metrics": {"speaker_similarity": 0.9, "duration_ratio": 1.3, "val_loss": 2.0}},
           {"label": "b", "metrics": {"speaker_similarity": 0.8, "duration_ratio": 0.95, "val_loss": 1.0}},
           {"label": "c", "metrics": {"speaker_similarity": 0.9, "duration_ratio": 0.5, "val_loss": 1.5}}]
    best = best_labels(cps)
    assert best["speaker_similarity"] == {"a", "c"}   # higher is better; ties both win
    assert best["duration_ratio"] == {"b"}            # closest to 1
    assert best["val_loss"] == {"b"}                  # lower is better
    all_tied = [{"label": x, "metrics": {"seconds": 1.0, "val_loss": 1.0}} for x in "ab"]
    assert best_labels(all_tied) == {}                # nothing to choose between


def test_report_has_every_section_best_marks_refusals_and_media(tmp_path):
    results = _results(tmp_path)
    md_path, html_path = write_report(results, tmp_path)
    md, page = md_path.read_text(), html_path.read_text()
    for section in SECTIONS:
        assert f"## {section}" in md and f"<h2>{section}</h2>" in page
    table = md.split("## Metrics")[1].split("## Training curves")[0]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    # alice is best on similarity, loss, accuracy and perplexity; bob's duration ratio 0.98 is closest to 1
    assert rows["alice/adapter"].count(BEST) == 4 and rows["bob"].count(BEST) == 1 and BEST not in rows["base"]
    assert "0.9100 ★" in rows["alice/adapter"] and "0.9800 ★" in rows["bob"]
    assert "| bad | REFUSED | bad.safetensors: base fingerprint mismatch" in md
    assert "class='refused'" in page and "base fingerprint mismatch" in page
    # user text is escaped in HTML and in Markdown tables
    assert "&lt;b&gt;tag&lt;/b&gt;" in page and "<b>tag</b>" not in page
    for cp in results["checkpoints"]:
        for s in cp["samples"]:
            assert f"<audio controls preload='none' src='{s['path']}'>" in page and f"]({s['path']})" in md
    figs = sorted((tmp_path / "figures").glob("*.png"))
    assert [f.name for f in figs] == ["mels_00.png", "mels_01.png", "training_curves.png"]
    assert all(f.read_bytes().startswith(PNG) and f.stat().st_size > 5000 for f in figs)
    assert "![training curves](figures/training_curves.png)" in md and "Runs: alice" in md
    assert json.loads((tmp_path / "results.json").read_text())["checkpoints"][1]["label"] == "alice/adapter"


def test_report_without_runs_or_adapters_says_so(tmp_path):
    results = _results(tmp_path)
    results["checks"] = []
    results["checkpoints"] = results["checkpoints"][:1]
    for cp in results["checkpoints"]:
        cp["training"] = None
    md = write_report(results, tmp_path)[0].read_text()
    assert "only the base model was evaluated" in md and "No metrics.jsonl was found" in md
    assert not (tmp_path / "figures" / "training_curves.png").exists()


@pytest.mark.parametrize("freq", [300.0, 1000.0, 4000.0])
def test_log_mel_of_a_tone_peaks_in_the_band_of_its_frequency(freq):
    t = np.arange(SR) / SR
    mel = log_mel(np.sin(2 * np.pi * freq * t), SR)
    assert mel.shape == (N_MELS, 1 + (SR - 1024) // 256)
    fb = mel_filterbank(SR)
    centers = (fb * np.linspace(0, SR / 2, fb.shape[1])).sum(1) / fb.sum(1)
    peak = int(np.argmax(mel.mean(axis=1)))
    assert abs(centers[peak] - freq) / freq < 0.1, (centers[peak], freq)
