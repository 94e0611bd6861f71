"""scripts/merge.py: a weighted merge of adapters into a gpt.pth that stock IndexTTS2 loads strictly, with only
the targeted tensors changed, a config that points at it, the license notice, and refusals that write nothing."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from indextts_integration import model_dir as md

pytestmark = pytest.mark.upstream

REPO = Path(__file__).resolve().parents[2]


def _delta64(path: Path) -> dict[str, torch.Tensor]:
    """{state-dict key of the base weight: B @ A * scale} in float64, in the base weight's layout."""
    from lora_engine.adapter_io import read_adapter_file

    tensors, doc = read_adapter_file(path)
    out = {}
    for target, entry in doc["targets"].items():
        d = tensors[f"{target}.lora_B"].double() @ tensors[f"{target}.lora_A"].double() * entry["scale"]
        out[f"{target}.weight"] = d.T if entry["base_kind"] == "Conv1D" else d  # Conv1D stores [in, out]
    return out


def _merge(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "merge.py"), *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_weighted_merge_loads_strictly_and_changes_only_targets(tiny_ckpt, random_adapter, tmp_path):
    from indextts.utils.checkpoint import load_checkpoint

    a = random_adapter(tmp_path / "alice.safetensors", "alice", 0, "gpt-attn-mlp")
    b = random_adapter(tmp_path / "bob.safetensors", "bob", 1, "gpt-attn+heads")
    out = tmp_path / "voices" / "gpt_blend.pth"
    proc = _merge("--model-dir", str(tiny_ckpt), "--adapter", f"{a}:0.7", "--adapter", f"{b}:0.3",
                  "--output", str(out), "--write-config")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "alice.safetensors x 0.7, bob.safetensors x 0.3" in proc.stdout and "Derivative Work" in proc.stdout

    fresh = md.build_unified_voice(md.load_config(tiny_ckpt))
    load_checkpoint(fresh, str(out))  # upstream's own loader, as IndexTTS2.__init__ uses it: strict=True
    original, merged = md.load_gpt_state_dict(tiny_ckpt), torch.load(out, weights_only=True)
    assert list(merged) == list(original)
    assert all(merged[k].dtype == original[k].dtype and merged[k].shape == original[k].shape for k in original)

    deltas = {}
    for path, w in ((a, 0.7), (b, 0.3)):
        for key, d in _delta64(path).items():
            deltas[key] = deltas.get(key, 0) + w * d
    changed = {k for k in original if not torch.equal(original[k], merged[k])}
    assert changed == set(deltas)
    assert "mel_head.weight" in changed and "gpt.h.0.mlp.c_fc.weight" in changed
    for key, delta in deltas.items():
        expected = (original[key].double() + delta).float()
        torch.testing.assert_close(merged[key], expected, atol=1e-6, rtol=0)

    config = yaml.safe_load((out.parent / "config.yaml").read_text())
    stock = yaml.safe_load((tiny_ckpt / "config.yaml").read_text())
    assert (tiny_ckpt / config["gpt_checkpoint"]).resolve() == out.resolve()
    assert {k: v for k, v in config.items() if k != "gpt_checkpoint"} == \
        {k: v for k, v in stock.items() if k != "gpt_checkpoint"}
    assert "bilibili Model Use License" in (out.parent / "gpt_blend.pth.LICENSE.txt").read_text()


def test_config_written_inside_the_model_dir_never_replaces_config_yaml(tiny_ckpt, random_adapter, tmp_path):
    import shutil

    model_dir = tmp_path / "checkpoints"
    shutil.copytree(tiny_ckpt, model_dir, symlinks=True)
    before = (model_dir / "config.yaml").read_bytes()
    a = random_adapter(tmp_path / "alice.safetensors", "alice", 0, "gpt-attn")  # same gpt.pth as the copy
    proc = _merge("--model-dir", str(model_dir), "--adapter", str(a), "--output", str(model_dir / "gpt_alice.pth"),
                  "--write-config")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (model_dir / "config.yaml").read_bytes() == before
    assert yaml.safe_load((model_dir / "config_gpt_alice.yaml").read_text())["gpt_checkpoint"] == "gpt_alice.pth"


def test_adapter_of_another_base_is_refused_and_nothing_is_written(tiny_ckpt, random_adapter, tmp_path):
    good = random_adapter(tmp_path / "alice.safetensors", "alice", 0, "gpt-attn")
    stranger = random_adapter(tmp_path / "stranger.safetensors", "stranger", 1, "gpt-attn", shift_base=0.5)
    out = tmp_path / "out" / "gpt_bad.pth"
    proc = _merge("--model-dir", str(tiny_ckpt), "--adapter", str(good), "--adapter", str(stranger),
                  "--output", str(out), "--write-config")
    assert proc.returncode != 0
    assert "base fingerprint mismatch" in proc.stderr and "gpt.h.0.attn.c_attn" in proc.stderr
    assert "Nothing was written" in proc.stderr and "--force-base" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not (out.parent / "config.yaml").exists()
    assert not (out.parent / "gpt_bad.pth.LICENSE.txt").exists()
    assert not out.parent.exists() or not list(out.parent.iterdir())  # no temporary file left either

    missing = _merge("--model-dir", str(tiny_ckpt), "--adapter", str(tmp_path / "nope.safetensors"),
                     "--output", str(out))
    assert missing.returncode != 0 and "nope.safetensors does not exist" in missing.stderr and not out.exists()

    forced = _merge("--model-dir", str(tiny_ckpt), "--adapter", str(stranger), "--output", str(out),
                    "--force-base")
    assert forced.returncode == 0 and out.is_file()
