"""Fixtures for the training tests: small, fast configs of the synthetic task."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from lora_engine.training import TrainConfig

REPO = Path(__file__).resolve().parents[3]


def small_config(output_dir: Path, **kw) -> TrainConfig:
    """A run of the synthetic task that takes a second or two on a CPU."""
    base = dict(output_dir=str(output_dir), max_steps=12, batch_size=8, learning_rate=1e-2, warmup_steps=2,
                save_every=6, eval_every=6, keep_last=2, progress=False, tensorboard=False, plot=False,
                device="cpu", amp="none", seed=7, lora_rank=4)
    base.update(kw)
    return TrainConfig(**base)


def lora_tensors(model_or_path) -> dict[str, torch.Tensor]:
    """The LoRA tensors of an adapter file (or of a checkpoint dir's adapter)."""
    from safetensors.torch import load_file

    path = Path(model_or_path)
    if path.is_dir():
        path = path / "adapter.safetensors"
    return load_file(str(path))


def subprocess_env() -> dict[str, str]:
    """Environment for child pythons: the repo importable, one thread each (2 cores are shared)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture
def python() -> str:
    return sys.executable
