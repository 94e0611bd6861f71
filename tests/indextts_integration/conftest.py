"""Upstream tier: this directory runs only where upstream IndexTTS2 (indextts2-cli, torch 2.8) imports.

The core tier runs on a newer torch without upstream, so there the whole directory is skipped with the
reason. Set the tier up with `bash scripts/setup_upstream_env.sh` and run pytest with the python it prints.
Shared fixtures: `tiny_ckpt` (a tiny real-class checkpoint dir, cached across runs) and `demo_dir`.
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
