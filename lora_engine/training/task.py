"""Task: the model-specific part of training, handed to the generic loop.

The loop knows nothing about any model: a task says how to build the base model, where the data comes from, how a
batch becomes a loss, and which modules get LoRA by default. The engine ships one (`synthetic.make_task`); the
IndexTTS2 integration provides another.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .config import TrainConfig
from .data import TrainData


@dataclasses.dataclass
class Task:
    name: str
    build_model: Callable[[TrainConfig], nn.Module]
    """The base model, on CPU, before LoRA is injected (the loop seeds torch first, injects, then moves it)."""
    load_data: Callable[[TrainConfig], tuple[TrainData, Sequence[Any] | None]]
    """(training data, validation examples or None); validation examples are batched with the train collate."""
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    """loss_fn(model, batch) -> scalar loss (mean over the batch); `batch` is already on the model's device."""
    default_target_modules: list[str]
    suggested_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Config values that suit this task (e.g. its learning rate), used by scripts/train.py for keys the user
    set neither in the YAML nor on the command line."""
    extra_trainables: Callable[[nn.Module], dict[str, nn.Parameter]] | None = None
    """Optional non-LoRA tensors to learn too (e.g. a speaker latent): trained with AdamW and saved with the
    adapter as extra tensors under these names."""
    periodic_eval: Callable[[nn.Module, int], dict[str, float]] | None = None
    """Optional periodic_eval(model, step) -> {metric: value}, called on rank 0 every `eval_audio_every` steps
    (eval mode, no grad); the metrics go to metrics.jsonl and checkpoint meta, and `best_metric` may pick one."""
    higher_is_better: tuple[str, ...] = ()
    """Metric names where larger is better (best_metric_goal "auto" maximises these, minimises the rest)."""


def load_task(ref: str, config: TrainConfig) -> Task:
    """Import "package.module:function" and call it with the config; the function returns a Task."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ValueError(f"task {ref!r}: expected 'package.module:function', e.g. "
                         "'lora_engine.training.synthetic:make_task'")
    factory = getattr(importlib.import_module(module_name), attr, None)
    if factory is None:
        raise ValueError(f"task {ref!r}: module {module_name} has no attribute {attr!r}")
    task = factory(config)
    if not isinstance(task, Task):
        raise TypeError(f"task {ref!r} returned {type(task).__name__}, expected lora_engine.training.Task")
    return task
