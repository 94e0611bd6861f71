"""Crash-safe training checkpoints.

Layout: <output_dir>/checkpoints/step-00000120/{adapter.safetensors, state.pt, meta.json, COMPLETE}.
A checkpoint is written into a hidden temp dir, fsynced, marked COMPLETE last, then renamed into place, so a
process killed at any moment leaves either a whole checkpoint or a hidden leftover that is ignored and cleaned.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

MARKER = "COMPLETE"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
ADAPTER_FILE = "adapter.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from (python, numpy, torch CPU, and the accelerator when present)."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        state["xpu"] = torch.xpu.get_rng_state_all()
    if hasattr(torch, "mps") and hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "xpu" in state and hasattr(torch, "xpu") and torch.xpu.is_available():
        torch.xpu.set_rng_state_all(state["xpu"])
    if "mps" in state and hasattr(torch, "mps") and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def write_checkpoint(root: str | Path, step: int, write_files: Callable[[Path], None],
                     meta: dict[str, Any]) -> Path:
    """Atomically create root/step-N: `write_files(tmp_dir)` fills a temp dir, then meta.json and the marker
    are added and the dir is renamed into place (replacing an older checkpoint of the same step)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_files(tmp)
    (tmp / META_FILE).write_text(json.dumps({"step": step, **meta}, indent=2, sort_keys=True))
    for f in tmp.iterdir():
        _fsync_path(f)
    (tmp / MARKER).write_text("ok\n")
    _fsync_path(tmp / MARKER)
    _fsync_path(tmp)
    if final.exists():  # same step written again (e.g. after a resume): move the old one out of the way first
        _discard(final)
    os.replace(tmp, final)
    _fsync_path(root)
    return final


def _discard(path: Path) -> None:
    """Rename out of sight first, so a kill during rmtree never leaves a half-deleted step-N that looks real."""
    trash = path.parent / f".trash-{path.name}-{os.getpid()}"
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def is_complete(path: Path) -> bool:
    return path.is_dir() and _STEP_DIR.match(path.name) is not None and (path / MARKER).is_file()


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if is_complete(p)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / META_FILE).read_text())


def best_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint written on a validation improvement (meta "is_best"), or None."""
    best = [p for p in list_checkpoints(root) if read_meta(p).get("is_best")]
    return best[-1] if best else None


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints except the newest `keep_last` and the best one; return the deleted."""
    ckpts = list_checkpoints(root)
    keep = set(ckpts[-keep_last:]) if keep_last > 0 else set()
    best = best_checkpoint(root)
    if best is not None:
        keep.add(best)
    removed = [p for p in ckpts if p not in keep]
    for p in removed:
        _discard(p)
    return removed


def clean_leftovers(root: str | Path) -> list[Path]:
    """Remove temp and trash dirs left by a killed process, and step dirs that never got their marker."""
    root = Path(root)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir()
             if p.is_dir() and (p.name.startswith((".tmp-", ".trash-")) or
                                (_STEP_DIR.match(p.name) and not (p / MARKER).is_file()))]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def load_state(path: str | Path) -> dict[str, Any]:
    """The training state of a checkpoint dir (optimizer, scheduler, scaler, RNG, data position, LoRA tensors)."""
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    # weights_only=False: the state holds python/numpy RNG tuples; the file is one we wrote ourselves.
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
