"""Training: one readable loop (`train`) around a model-specific `Task`; see loop.py."""
from .config import TrainConfig, load_config
from .data import BatchStream, TrainData, load_manifest
from .loop import NonFiniteLossError, TrainResult, train
from .task import Task, load_task

__all__ = ["TrainConfig", "load_config", "TrainData", "BatchStream", "load_manifest", "Task", "load_task",
           "train", "TrainResult", "NonFiniteLossError"]
