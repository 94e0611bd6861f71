"""SIGKILL a training process mid-run: every checkpoint on disk is whole, and resuming finishes the run exactly
as an uninterrupted one would have."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lora_engine.adapter_io import read_adapter_file
from lora_engine.training import train
from lora_engine.training.checkpoint import MARKER, list_checkpoints, load_state
from lora_engine.training.metrics import read_metrics

from .conftest import REPO, lora_tensors, small_config, subprocess_env

# long enough that the kill (up to 0.6 s after the first checkpoint) always lands mid-run on a fast machine
RUN = dict(max_steps=160, save_every=4, eval_every=8, batch_size=8, keep_last=2, lora_dropout=0.1)


@pytest.fixture
def one_thread():
    """The child runs with one thread; the in-process runs compared with it must sum in the same order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cli(cfg) -> list[str]:
    return ["--output-dir", cfg.output_dir, "--max-steps", str(cfg.max_steps), "--save-every", str(cfg.save_every),
            "--eval-every", str(cfg.eval_every), "--batch-size", str(cfg.batch_size), "--keep-last",
            str(cfg.keep_last), "--lora-dropout", str(cfg.lora_dropout), "--lora-rank", str(cfg.lora_rank),
            "--learning-rate", str(cfg.learning_rate), "--warmup-steps", str(cfg.warmup_steps), "--seed",
            str(cfg.seed), "--device", "cpu", "--amp", "none", "--no-tensorboard", "--no-plot", "--no-progress"]


def _assert_whole(ckpt_root: Path) -> None:
    for p in ckpt_root.iterdir():
        if p.name.startswith("step-"):  # visible names are always complete checkpoints
            assert (p / MARKER).is_file(), f"partial checkpoint visible: {p}"
            load_state(p)
            read_adapter_file(p / "adapter.safetensors")  # checks header, hashes and shapes
        else:
            assert p.name.startswith((".tmp-", ".trash-")), p


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path: Path, one_thread) -> None:
    killed_cfg = small_config(tmp_path / "killed", **RUN)
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "train.py"),
                             *_cli(killed_cfg)], env=subprocess_env(), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt_root = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 120
    while not list_checkpoints(ckpt_root) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.6))  # "at any moment", possibly mid-checkpoint
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{err.decode()}"

    _assert_whole(ckpt_root)
    steps_done = int(list_checkpoints(ckpt_root)[-1].name.split("-")[1])
    assert 0 < steps_done < RUN["max_steps"]

    resumed = train(small_config(tmp_path / "killed", **RUN, resume=True))
    _assert_whole(ckpt_root)
    assert not [p for p in ckpt_root.iterdir() if p.name.startswith(".")]  # leftovers cleaned on resume
    straight = train(small_config(tmp_path / "straight", **RUN))

    a = lora_tensors(tmp_path / "straight" / "adapter.safetensors")
    b = lora_tensors(tmp_path / "killed" / "adapter.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.step == straight.step == RUN["max_steps"] and resumed.loss == straight.loss
    steps = [r["step"] for r in read_metrics(tmp_path / "killed" / "metrics.jsonl") if "val_loss" not in r]
    assert steps == list(range(1, RUN["max_steps"] + 1))
