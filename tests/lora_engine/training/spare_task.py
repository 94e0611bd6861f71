"""A task for the tests: the synthetic GPT-2 with one extra Linear that its loss never uses (a target that gets no
gradient). Importable by `--task tests.lora_engine.training.spare_task:make_task` in a torchrun subprocess."""
from __future__ import annotations

from torch import nn

from lora_engine.training import synthetic
from lora_engine.training.task import Task


def build_model(config=None) -> nn.Module:
    model = synthetic.build_model(config)
    model.spare = nn.Linear(32, 32)
    return model


def make_task(config=None) -> Task:
    base = synthetic.make_task(config)
    return Task(base.name, build_model, base.load_data, base.loss_fn, [*base.default_target_modules, "spare"])
