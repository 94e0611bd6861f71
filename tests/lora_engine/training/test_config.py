"""TrainConfig: YAML with overrides, manifest entries with weights, actionable errors, the documented example."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from lora_engine.training import TrainConfig, load_config

from .conftest import REPO

EXAMPLE = REPO / "configs" / "lora_finetune_example.yaml"


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 3.0e-4\nbatch_size: 4\ntrain_manifests: [a.jsonl, b.jsonl]\n")
    cfg = load_config(path, {"batch_size": 2, "seed": None, "amp": "bf16"})
    assert (cfg.learning_rate, cfg.batch_size, cfg.amp, cfg.seed) == (3e-4, 2, "bf16", TrainConfig().seed)
    assert cfg.train_manifests == ["a.jsonl", "b.jsonl"] and cfg.train_weights is None


def test_manifest_entries_with_weights() -> None:
    cfg = TrainConfig(train_manifests=["a.jsonl", {"path": "b.jsonl", "weight": 2.5}])
    assert cfg.train_manifests == ["a.jsonl", "b.jsonl"] and cfg.train_weights == [1.0, 2.5]
    with pytest.raises(ValueError, match="one weight per manifest"):
        TrainConfig(train_manifests=["a.jsonl"], train_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(train_manifests=[{"path": "a", "weight": 1.0}], train_weights=[1.0])


@pytest.mark.parametrize("bad, match", [
    ({"amp": "fp8"}, "amp must be one of"), ({"device": "tpu"}, "device must be one of"),
    ({"batch_size": 0}, "batch_size must be >= 1"), ({"learning_rate": 0.0}, "learning_rate must be > 0"),
    ({"max_steps": 0}, "max_steps must be >= 1"), ({"min_lr_ratio": 2.0}, "min_lr_ratio"),
])
def test_invalid_values_name_the_field(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


def test_unknown_key_lists_the_known_ones(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("learning_rat: 1.0e-4\n")
    with pytest.raises(ValueError, match=r"unknown training config keys \['learning_rat'\].*learning_rate"):
        load_config(path)


def test_example_config_has_every_key_documented() -> None:
    text = EXAMPLE.read_text()
    data = yaml.safe_load(text)
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert sorted(data) == sorted(fields)
    assert load_config(EXAMPLE) == TrainConfig()  # the example shows the defaults
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\w+):", line)
        if m:
            assert lines[i - 1].startswith("#"), f"key {m.group(1)} has no comment line above it"
