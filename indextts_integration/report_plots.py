"""Figures for the validation report (matplotlib, Agg): log-mel spectrograms of samples side by side, and
the loss / periodic-eval curves of each training run. Each figure is written atomically as a PNG."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import soundfile as sf

N_FFT, HOP, N_MELS = 1024, 256, 80  # IndexTTS2's s2mel settings at 22050 Hz
# metrics.jsonl keys the training loop writes itself; any other number in a line is a periodic eval metric
LOOP_KEYS = {"step", "loss", "lr", "grad_norm", "samples_per_s", "val_loss", "best_val_loss", "loss_scale",
             "nonfinite_total", "skipped", "best_score"}


def _plt() -> Any:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def mel_filterbank(sr: int, n_fft: int = N_FFT, n_mels: int = N_MELS, fmax: float | None = None) -> np.ndarray:
    """[n_mels, n_fft//2+1] triangular filters evenly spaced on the HTK mel scale."""
    def to_mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def to_hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    edges = to_hz(np.linspace(0.0, to_mel(np.array(fmax or sr / 2)), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lo) / np.maximum(mid - lo, 1e-9)
    down = (hi - freqs[None]) / np.maximum(hi - mid, 1e-9)
    return np.clip(np.minimum(up, down), 0.0, None)


def log_mel(audio: np.ndarray, sr: int) -> np.ndarray:
    """[n_mels, frames] log10 mel power (Hann window, hop 256), floored at 1e-10."""
    audio = np.asarray(audio, dtype=np.float64)
    if audio.size < N_FFT:
        audio = np.pad(audio, (0, N_FFT - audio.size))
    frames = 1 + (audio.size - N_FFT) // HOP
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(frames)[:, None]
    power = np.abs(np.fft.rfft(audio[idx] * np.hanning(N_FFT), axis=1)) ** 2
    return np.log10(np.maximum(mel_filterbank(sr) @ power.T, 1e-10))


def _save(fig: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, bbox_inches="tight")
    _plt().close(fig)
    os.replace(tmp, path)
    return path


def plot_mels_side_by_side(samples: Sequence[tuple[str, str | os.PathLike]], title: str, path: Path) -> Path:
    """One row of log-mel spectrograms, one panel per (checkpoint label, wav path), on a shared color scale."""
    plt = _plt()
    mels = []
    for _, wav in samples:
        audio, sr = sf.read(str(wav), dtype="float32", always_2d=True)
        mels.append((log_mel(audio.mean(axis=1), sr), sr))
    vmax = max(float(m.max()) for m, _ in mels)
    fig, axes = plt.subplots(1, len(samples), figsize=(3.6 * len(samples), 3.0), dpi=90, squeeze=False)
    for ax, (label, _), (mel, sr) in zip(axes[0], samples, mels):
        seconds = mel.shape[1] * HOP / sr
        ax.imshow(mel, origin="lower", aspect="auto", vmin=vmax - 8, vmax=vmax, cmap="magma",
                  extent=(0, seconds, 0, N_MELS))
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("seconds")
    axes[0][0].set_ylabel("mel band")
    fig.suptitle(title, fontsize=10, y=1.04)
    return _save(fig, path)


def plot_training_curves(runs: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Train/val loss per run (left) and any periodic eval metric, e.g. speaker similarity (right)."""
    plt = _plt()
    eval_keys = sorted({k for recs in runs.values() for r in recs for k in r
                        if k not in LOOP_KEYS and not k.startswith("best_") and _num(r[k])})
    fig, axes = plt.subplots(1, 2 if eval_keys else 1, figsize=(12 if eval_keys else 7, 4), dpi=90, squeeze=False)
    loss_ax = axes[0][0]
    for i, (name, recs) in enumerate(runs.items()):
        color = f"C{i % 10}"
        train = [(r["step"], r["loss"]) for r in recs if "val_loss" not in r and _num(r.get("loss"))]
        val = [(r["step"], r["val_loss"]) for r in recs if _num(r.get("val_loss"))]
        if train:
            loss_ax.plot(*zip(*train), color=color, linewidth=1, alpha=0.6, label=f"{name} train")
        if val:
            loss_ax.plot(*zip(*val), "o-", color=color, label=f"{name} val")
        for j, key in enumerate(eval_keys):
            pts = [(r["step"], r[key]) for r in recs if _num(r.get(key))]
            if pts:
                axes[0][1].plot(*zip(*pts), marker="s", color=color, linestyle=["-", "--", ":"][j % 3],
                                label=f"{name} {key}")
    loss_ax.set(xlabel="optimizer step", ylabel="loss", title="training loss")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    if eval_keys:
        axes[0][1].set(xlabel="optimizer step", title="periodic audio evaluation")
    return _save(fig, path)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
