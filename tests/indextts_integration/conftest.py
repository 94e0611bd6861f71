"""Upstream tier: this directory runs only where upstream IndexTTS2 (indextts2-cli, torch 2.8) imports.

The core tier runs on a newer torch without upstream, so there the whole directory is skipped with the
reason. Set the tier up with `bash scripts/setup_upstream_env.sh` and run pytest with the python it prints.
Shared fixtures: `tiny_ckpt` (a tiny real-class checkpoint dir, cached across runs), `demo_dir`, and
`random_adapter` (writes a voice adapter with random B for the tiny checkpoint).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

try:
    import indextts.gpt.model_v2  # noqa: F401
except Exception as exc:  # noqa: BLE001 - any import failure means "not the upstream tier"
    pytest.skip(f"upstream tier not installed ({type(exc).__name__}: {exc}); run "
                "`bash scripts/setup_upstream_env.sh` and use the python it prints", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]


def _tiny_key() -> str:
    """Cache key: the sources that shape the tiny checkpoint, and the torch/indextts versions."""
    import torch
    from importlib.metadata import version

    h = hashlib.sha1(f"{torch.__version__}|{version('indextts2-cli')}".encode())
    for name in ("tiny_checkpoint.py", "model_dir.py", "demo_sentences.py"):
        h.update((REPO / "indextts_integration" / name).read_bytes())
    return h.hexdigest()[:12]


@pytest.fixture(scope="session")
def tiny_ckpt() -> Path:
    """A tiny checkpoint dir made once per source version (~20 s) and reused; tests must not modify it."""
    from indextts_integration.tiny_checkpoint import make_tiny_checkpoint

    root = Path(os.environ.get("INDEXTTS_LORA_CACHE", Path.home() / ".cache" / "indextts-lora"))
    final = root / f"tiny-ckpt-{_tiny_key()}"
    if not (final / "config.yaml").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="tiny-ckpt-", dir=root))
        make_tiny_checkpoint(tmp, seed=0)
        try:
            os.replace(tmp, final)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    return final


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """Six demo utterances (espeak-ng speech where installed) + transcripts.csv."""
    from indextts_integration.demo_data import make_demo_dataset

    out = tmp_path_factory.mktemp("demo")
    make_demo_dataset(out, n_utterances=6)
    return out


@pytest.fixture(scope="session")
def random_adapter(tiny_ckpt):
    """make(path, name, seed, preset="gpt-attn-mlp", shift_base=0.0) -> path: an adapter file whose B is random
    (so it really changes the model); shift_base != 0 makes it for a different base (block 0's c_attn moved)."""
    import torch

    from indextts_integration import model_dir as md
    from indextts_integration.targets import preset_targets
    from lora_engine import LoRASpec, inject_lora, lora_layers, save_adapter

    def make(path: Path, name: str, seed: int, preset: str = "gpt-attn-mlp", shift_base: float = 0.0) -> Path:
        gpt = md.load_unified_voice(tiny_ckpt)
        if shift_base:
            with torch.no_grad():
                gpt.gpt.h[0].attn.c_attn.weight.add_(shift_base)
        inject_lora(gpt, LoRASpec(preset_targets(preset), rank=4, alpha=8), adapter=name)
        torch.manual_seed(seed)
        with torch.no_grad():
            for layer in lora_layers(gpt).values():
                layer.lora_B[name].normal_(0, 0.05)
        save_adapter(gpt, path, adapter=name)
        return path

    return make
