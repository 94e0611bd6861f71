"""Pick the device and the mixed-precision recipe for it; nothing else in the loop assumes CUDA."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, ContextManager

import torch


def _available(kind: str) -> bool:
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if kind == "xpu":
        return hasattr(torch, "xpu") and torch.xpu.is_available()
    return kind == "cpu"


def peak_memory_gb(device: torch.device) -> float | None:
    """Most memory the process's tensors held on `device` so far, in GB (1e9 bytes); None where torch keeps no
    count (CPU, MPS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    if device.type == "xpu":
        return torch.xpu.max_memory_allocated(device) / 1e9
    return None


def training_attention(device: torch.device) -> ContextManager[Any]:
    """scaled_dot_product_attention without the cuDNN backend, on CUDA. torch 2.11 prefers cuDNN on an H200, and
    cuDNN builds a plan the first time it meets a sequence length: 127-146 ms, against flash attention's 0.6 ms,
    which is also faster at a length seen before (0.60 vs 0.97 ms; benchmarks/results/h200-2026-11-29-shape_setup.json).
    Training on clips of varied length meets a new length nearly every step. The backward follows the forward's
    choice, so only the forward needs this."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` takes the first available of cuda, xpu, mps, cpu; cuda/xpu get index `local_rank` (one per process)."""
    if name == "auto":
        name = next(k for k in ("cuda", "xpu", "mps", "cpu") if _available(k))
    if not _available(name):
        raise RuntimeError(f"--device {name} was asked for but this torch ({torch.__version__}) sees no {name} "
                           "device; use --device auto to take the best available one")
    if name in ("cuda", "xpu"):
        return torch.device(name, local_rank)
    return torch.device(name)


@dataclasses.dataclass
class AmpRecipe:
    """`dtype` None means fp32. `use_scaler` only with fp16: bf16 has fp32's range and needs no loss scaling."""

    dtype: torch.dtype | None
    use_scaler: bool
    device_type: str

    @property
    def name(self) -> str:
        return {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self) -> ContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.use_scaler)


def amp_recipe(device: torch.device, amp: str = "auto") -> AmpRecipe:
    """`auto`: bf16 where the accelerator supports it, fp16 on MPS or pre-Ampere CUDA, fp32 on CPU."""
    if amp == "auto":
        if device.type == "cuda":
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif device.type == "xpu":
            amp = "bf16"
        elif device.type == "mps":
            amp = "fp16"
        else:
            amp = "none"
    if amp == "none":
        return AmpRecipe(None, False, device.type)
    if amp == "bf16":
        return AmpRecipe(torch.bfloat16, False, device.type)
    if amp == "fp16":
        return AmpRecipe(torch.float16, True, device.type)
    raise ValueError(f"amp must be one of auto, bf16, fp16, none; got {amp!r}")
