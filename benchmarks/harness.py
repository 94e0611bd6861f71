"""Timing and memory helpers shared by the benchmark sections: CUDA events, interleaved medians, peak memory."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_once(fn: Callable[[], object]) -> float:
    """Milliseconds of one call: CUDA events on the GPU (device timeline), a synced host clock on CPU."""
    if torch.cuda.is_available():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(fns: dict[str, Callable[[], object]], warmup: int = 5, iters: int = 20) -> dict[str, dict]:
    """Median ms of each callable, timed round-robin so that clock drift hits every variant alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            samples[name].append(time_once(fn))
    return {k: summary(v) for k, v in samples.items()}


def summary(ms: list[float]) -> dict:
    q = sorted(ms)
    return {"median_ms": statistics.median(q), "min_ms": q[0], "p90_ms": q[int(0.9 * (len(q) - 1))], "n": len(q)}


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among `tensors` (shared storages counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def static_footprint(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Parameters + buffers + optimizer state of one model, and the low-precision copies its LoRA layers keep
    between steps (train_casts.py: the kept cast base and factor copies): what it holds between steps."""
    from lora_engine import train_casts

    tensors = list(model.parameters()) + list(model.buffers())
    for module in model.modules():
        copies = module.__dict__.get(train_casts.ATTR)
        if copies is not None:
            tensors += [t for t in copies.tensors() if t is not None]
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v)]
    return tensor_bytes(tensors)


def peak_step_bytes(step: Callable[[], object], model: torch.nn.Module, optimizer=None) -> dict:
    """Peak memory of one step as if this model were alone on the GPU: its static footprint plus the
    step's own peak above what was allocated before it (other resident models are not counted)."""
    if not torch.cuda.is_available():
        return {"peak_bytes": None}
    sync()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    sync()
    transient = torch.cuda.max_memory_allocated() - before
    footprint = static_footprint(model, optimizer)
    return {"peak_bytes": footprint + transient, "static_bytes": footprint, "step_transient_bytes": transient}


def gpu_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace("NVIDIA ", "").replace(" ", "-").lower()
    return "cpu"


def apply_train_tiles(path: str | None, tma: bool = True) -> dict:
    """The fused training kernels (lora_train_triton) with the tiles a `benchmarks/tune_train.py --out` JSON picked
    per layer shape and pass (the passes it did not sweep keep theirs); `tma` False: pointer loads instead of TMA
    descriptors. Returns what was applied, for the results file."""
    from lora_engine.kernels import lora_train_triton as lt
    lt.TMA = tma
    if not path:
        return {}
    tiles = json.loads(Path(path).read_text())["tuned"]
    for shape, passes in tiles.items():
        n_in, n_out = map(int, shape.split("x"))
        for which, cfg in passes.items():
            if which in lt.DEFAULTS:  # (the timings sit beside the tiles)
                lt.set_config(n_in, n_out, which, cfg)
    return tiles
