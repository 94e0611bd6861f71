"""docs/training_guide.md covers every setting: each key of configs/lora_finetune_example.yaml and TrainConfig,
each flag of scripts/train.py --help and scripts/prepare_dataset.py --help (so a new flag needs its entry)."""
import argparse
import dataclasses
import re

import yaml

from lora_engine.training import TrainConfig
from tests.docs.error_messages import REPO
from tests.script_loader import load_script

GUIDE = (REPO / "docs" / "training_guide.md").read_text()


def _parser(script: str) -> argparse.ArgumentParser:
    return load_script(script).build_parser()


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            out += [s for s in action.option_strings if not s.startswith("--no-")]
        else:
            out += action.option_strings
    return out


def _documented_flag(flag: str) -> bool:
    return f"`{flag}`" in GUIDE or f"`--[no-]{flag[2:]}`" in GUIDE or re.search(rf"`{re.escape(flag)}[ `/,]", GUIDE)


def test_every_config_key_is_documented():
    keys = set(yaml.safe_load((REPO / "configs" / "lora_finetune_example.yaml").read_text()))
    keys |= {f.name for f in dataclasses.fields(TrainConfig)}
    assert len(keys) > 30
    missing = sorted(k for k in keys if f"`{k}`" not in GUIDE)
    assert not missing, f"settings without an entry in docs/training_guide.md: {missing}"


def test_every_train_and_prepare_flag_is_documented():
    flags = _flags(_parser("train")) + _flags(_parser("prepare_dataset"))
    assert "--learning-rate" in flags and "--prompt-mode" in flags
    missing = [f for f in flags if not _documented_flag(f)]
    assert not missing, f"flags without an entry in docs/training_guide.md: {missing}"


def test_task_suggestions_quoted_in_the_guide_are_the_code_defaults():
    text = (REPO / "indextts_integration" / "training.py").read_text()
    suggested = re.search(r"suggested_config=\{(.*?)\}", text, flags=re.S).group(1)
    pairs = dict(re.findall(r'"(\w+)": ([\d.e-]+)', suggested))
    assert pairs, "indextts_integration/training.py has no suggested_config"
    for key, value in pairs.items():
        assert f"{key} {value}" in GUIDE, f"the guide should quote the IndexTTS2 task's {key} {value}"


def test_every_indextts2_task_option_is_documented():
    text = (REPO / "indextts_integration" / "training.py").read_text()
    defaults = re.search(r"^DEFAULTS = \{(.*?)\}$", text, flags=re.S | re.M).group(1)
    options = re.findall(r'"(\w+)":', defaults)
    assert "mel_weight" in options and len(options) >= 6
    section = GUIDE.split("### IndexTTS2 task options", 1)[1].split("\n## ", 1)[0]
    missing = [o for o in options if f"| `{o}` |" not in section]
    assert not missing, f"IndexTTS2 task options without a row in the training guide: {missing}"
