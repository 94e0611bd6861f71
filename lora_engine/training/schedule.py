"""Learning-rate schedule: linear warmup, then cosine decay to a floor."""
from __future__ import annotations

import math

import torch


class WarmupCosine:
    """LR multiplier for step `i`: (i+1)/(warmup+1) during warmup, then cosine from 1 down to `min_ratio`.

    A class rather than a lambda so that LambdaLR.state_dict() records its settings with the checkpoint.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> None:
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                            min_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over WarmupCosine; call .step() once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_ratio))
