"""scripts/train.py: --help documents the flags, YAML + flag precedence, task dispatch, the synthetic default."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lora_engine.training.metrics import read_metrics
from tests.script_loader import load_script

from .conftest import REPO, subprocess_env

SEED_FLAGS = ["--train-manifest", "--val-manifest", "--output-dir", "--epochs", "--max-steps", "--batch-size",
              "--grad-accum", "--lora-rank", "--lora-alpha", "--lora-dropout", "--learning-rate", "--amp",
              "--compile", "--resume", "--save-every", "--config", "--seed", "--device", "--model-dir",
              "--log-every", "--eval-every", "--keep-last"]


@pytest.fixture(scope="module")
def script():
    return load_script("train")


def test_help_explains_every_flag(script) -> None:
    parser = script.build_parser()
    text = parser.format_help()
    for flag in SEED_FLAGS:
        assert flag in text, flag
    undocumented = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
    assert not undocumented
    assert "{bf16,fp16,none}" in text.replace("auto,", "")


def test_yaml_then_flags_then_task_suggestions(script, tmp_path: Path) -> None:
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text("batch_size: 4\nlearning_rate: 0.5\nlora_rank: 2\n")
    args = script.build_parser().parse_args(["--config", str(cfg_path), "--batch-size", "6", "--no-plot",
                                             "--train-manifest", "a.jsonl", "--train-manifest", "b.jsonl",
                                             "--train-weights", "1", "3"])
    cfg, ref = script.resolve_config(args)
    assert (cfg.batch_size, cfg.learning_rate, cfg.lora_rank, cfg.plot) == (6, 0.5, 2, False)
    assert cfg.train_manifests == ["a.jsonl", "b.jsonl"] and cfg.train_weights == [1.0, 3.0]
    assert ref == script.SYNTHETIC_TASK
    cfg, ref = script.resolve_config(script.build_parser().parse_args(["--model-dir", "ckpts"]))
    assert ref == script.INDEXTTS_TASK and cfg.model_dir == "ckpts"
    cfg, ref = script.resolve_config(script.build_parser().parse_args(["--task", "pkg.mod:make", "--model-dir", "x"]))
    assert ref == "pkg.mod:make"


def test_bad_task_reference_is_explained(script) -> None:
    from lora_engine.training import TrainConfig, load_task

    with pytest.raises(ValueError, match="package.module:function"):
        load_task("no_colon_here", TrainConfig())
    with pytest.raises(ValueError, match="has no attribute"):
        load_task("lora_engine.training.synthetic:nope", TrainConfig())


def test_cli_trains_the_synthetic_default(tmp_path: Path) -> None:
    """No --model-dir, no manifests: the embedded demo trains, with the task's suggested settings."""
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--output-dir", str(out),
                           "--max-steps", "30", "--eval-every", "15", "--device", "cpu", "--no-tensorboard"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done at step 30" in proc.stderr and "train:" in proc.stderr  # summary line and the tqdm bar
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["learning_rate"] == 1e-2 and saved["max_steps"] == 30  # suggestion, and the flag that won
    lines = [r for r in read_metrics(out / "metrics.jsonl") if "val_loss" not in r]
    assert len(lines) == 30 and lines[-1]["loss"] < lines[0]["loss"] - 0.5
    assert (out / "loss_curve.png").is_file() and (out / "adapter.safetensors").is_file()
