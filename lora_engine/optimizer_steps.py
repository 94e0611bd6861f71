"""How many optimizer steps this process has taken: part of every cache key built on parameter versions.

The engine caches tensors derived from the LoRA factors (train_casts.py's low-precision copies, the layers' inference
factors, merge.py's fused plan) and keys them on each factor's version counter and storage. A fused optimizer
(torch.optim.AdamW(fused=True), what the training loop uses on CUDA) updates the parameters in place WITHOUT bumping
their version counters (torch 2.8-2.13), so a version key alone would keep serving the factors of the first step: the
forward would never see training. The keys therefore also carry this count, which a global optimizer hook advances
after every step of every optimizer (a step that did not touch the factors only costs a refresh).
"""
from __future__ import annotations

from torch.optim.optimizer import register_optimizer_step_post_hook

_taken = [0]


def _advance(optimizer, args, kwargs) -> None:
    _taken[0] += 1


_HOOK = register_optimizer_step_post_hook(_advance)


def steps() -> int:
    """Optimizer steps taken so far (any optimizer, fused or not)."""
    return _taken[0]
