"""Checkpoint dirs appear whole or not at all; pruning keeps the newest K and the best; RNG round trip."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_engine.training.checkpoint import (MARKER, best_checkpoint, clean_leftovers, latest_checkpoint,
                                             list_checkpoints, prune_checkpoints, read_meta, rng_state,
                                             set_rng_state, write_checkpoint)


def _write(root: Path, step: int, **meta) -> Path:
    return write_checkpoint(root, step, lambda d: torch.save({"step": step}, d / "state.pt"), meta)


def test_write_is_all_or_nothing(tmp_path: Path) -> None:
    _write(tmp_path, 2)

    def crash(d: Path) -> None:
        (d / "state.pt").write_bytes(b"half")
        raise KeyboardInterrupt  # the process dies while writing

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, 4, crash, {})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002"]
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    assert any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    (tmp_path / "step-00000009").mkdir()  # a step dir without its marker (e.g. copied by hand, half done)
    cleaned = clean_leftovers(tmp_path)
    names = sorted(p.name for p in cleaned)
    assert len(names) == 2 and names[0].startswith(".tmp-step-00000004-") and names[1] == "step-00000009"
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000002"]


def test_rewrite_of_a_step_replaces_it(tmp_path: Path) -> None:
    _write(tmp_path, 3, val_loss=2.0)
    _write(tmp_path, 3, val_loss=1.0)
    (only,) = list_checkpoints(tmp_path)
    assert read_meta(only)["val_loss"] == 1.0 and (only / MARKER).is_file()


def test_prune_keeps_last_k_and_the_best(tmp_path: Path) -> None:
    for step in range(1, 8):
        _write(tmp_path, step, is_best=step in (2, 3), val_loss=float(10 - step))
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000006", "step-00000007"]
    assert len(removed) == 4 and best_checkpoint(tmp_path).name == "step-00000003"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_rng_state_round_trip() -> None:
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])
