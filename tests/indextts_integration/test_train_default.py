"""scripts/train.py where IndexTTS2 imports: with no --model-dir and no manifests it trains a UnifiedVoice LoRA on
the embedded default (made on first use, then reused); task options reach the task; --help covers every setting."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lora_engine.training import TrainConfig
from tests.script_loader import load_script

pytestmark = pytest.mark.upstream

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def script():
    return load_script("train")


def _train(cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2", "INDEXTTS_LORA_CACHE": str(cache)}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *args], env=env,
                          capture_output=True, text=True, timeout=500)


def test_no_model_dir_trains_unified_voice_on_the_embedded_default(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "run"
    common = ["--output-dir", str(out), "--device", "cpu", "--no-tensorboard", "--no-progress",
              "--task-option", "mel_weight=0.9", "--task-option", "text_weight=0.1"]
    first = _train(cache, *common, "--max-steps", "8")
    assert first.returncode == 0, first.stderr[-5000:]
    assert "[embedded default] making" in first.stdout + first.stderr
    assert "training on the embedded default" in first.stderr and "done at step 8" in first.stderr

    saved = yaml.safe_load((out / "config.yaml").read_text())
    (root,) = cache.glob("embedded-default-*")
    assert saved["model_dir"] == str(root / "checkpoints")
    assert saved["train_manifests"] == [str(root / "prepared" / "train_manifest.jsonl")]
    assert saved["task_options"] == {"mel_weight": 0.9, "text_weight": 0.1}
    assert saved["learning_rate"] == 3e-3 and saved["adapter_name"] == "demo"  # the default's suggestions
    header = json.loads(_adapter_header(out / "adapter.safetensors"))
    assert header["adapter"] == "demo" and all(t.startswith("gpt.h.") for t in header["targets"])
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line and "val_loss" not in line]
    assert len(losses) == 8 and min(losses[-3:]) < losses[0]

    again = _train(cache, *common, "--max-steps", "10", "--resume")
    assert again.returncode == 0, again.stderr[-5000:]
    assert "[embedded default] making" not in again.stdout + again.stderr  # made once, then reused
    assert "done at step 10" in again.stderr


def _adapter_header(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["lora_engine"]


def test_help_names_every_setting_and_the_task_options(script):
    parser = script.build_parser()
    text = parser.format_help()
    flags = {o for a in parser._actions for o in a.option_strings}
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.name == "train_manifests":
            flag = "--train-manifest"
        elif field.name == "val_manifests":
            flag = "--val-manifest"
        elif field.name == "task_options":
            flag = "--task-option"
        assert flag in flags, f"TrainConfig.{field.name} has no flag"
    for option in ("text_weight", "mel_weight", "gpt_dropout", "gradient_checkpointing", "learn_speaker_latent",
                   "max_tokens", "gpt-attn-mlp", "embedded default"):
        assert option in text, option


def test_task_options_parse_as_yaml_and_bad_ones_are_explained(script, tmp_path):
    assert script.parse_task_options(["mel_weight=0.9", "gradient_checkpointing=true", "x=a b"]) == \
        {"mel_weight": 0.9, "gradient_checkpointing": True, "x": "a b"}
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        script.parse_task_options(["mel_weight"])
    from indextts_integration.training import task_options

    with pytest.raises(ValueError, match=r"unknown IndexTTS2 task option\(s\) \['mel_wieght'\]"):
        task_options(TrainConfig(task_options={"mel_wieght": 1.0}))
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("model_dir: ckpt\ntask_options: {mel_weight: 0.5, gpt_dropout: 0.1}\n")
    cfg, ref = script.resolve_config(script.build_parser().parse_args(
        ["--config", str(cfg_file), "--task-option", "mel_weight=0.7"]))
    assert ref == script.INDEXTTS_TASK and cfg.task_options == {"mel_weight": 0.7, "gpt_dropout": 0.1}
