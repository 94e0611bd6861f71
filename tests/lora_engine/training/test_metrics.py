"""metrics.jsonl lines, resume truncation, torn lines, the loss-curve PNG."""
from __future__ import annotations

import json
import math
from pathlib import Path

from lora_engine.training.metrics import MetricsLog, plot_loss_curve, read_metrics


def test_jsonl_lines_and_resume_truncation(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, tensorboard=False)
    for step in range(1, 6):
        log.log({"step": step, "loss": 1.0 / step, "lr": 0.1})
    log.log({"step": 5, "loss": 0.2, "lr": 0.1, "val_loss": 0.25})
    log.log({"step": 6, "loss": math.nan, "lr": 0.1, "skipped": True})
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 7 and json.loads(lines[-1])["loss"] == "nan"  # strict JSON, no bare NaN
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # torn line of a killed run
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 7

    MetricsLog(tmp_path, tensorboard=False, resume_step=3).close()  # resume from a step-3 checkpoint
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_rank_other_than_zero_writes_nothing(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "out", enabled=False)
    log.log({"step": 1, "loss": 1.0, "lr": 0.1})
    assert not (tmp_path / "out").exists()


def test_plot(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, tensorboard=False)
    for step in range(1, 21):
        log.log({"step": step, "loss": 3.0 / step, "lr": 0.1})
        if step % 5 == 0:
            log.log({"step": step, "loss": 3.0 / step, "lr": 0.1, "val_loss": 3.5 / step})
    png = plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss_curve.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not list(tmp_path.glob("*.tmp.png"))
