"""TrainConfig: every knob of a LoRA training run, read from YAML and overridden from the command line."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

AMP_CHOICES = ("auto", "bf16", "fp16", "none")
DEVICE_CHOICES = ("auto", "cuda", "mps", "xpu", "cpu")
BASE_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # None: as loaded
BASE_DTYPE_CHOICES = tuple(BASE_DTYPES)


@dataclasses.dataclass
class TrainConfig:
    """Flat on purpose: each field is one YAML key and one `--flag` (underscores become dashes)."""

    # what to train
    task: str | None = None                 # "module:function" returning a Task; None = synthetic / --model-dir
    model_dir: str | None = None            # model checkpoint directory, handed to the task
    train_manifests: list[str] = dataclasses.field(default_factory=list)
    train_weights: list[float] | None = None  # sampling weight per train manifest (None = by size)
    val_manifests: list[str] = dataclasses.field(default_factory=list)
    output_dir: str = "runs/lora"
    adapter_name: str = "default"
    task_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # read by the task (e.g. loss weights)

    # LoRA
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None  # None = the task's default targets

    # length of the run
    epochs: float = 1.0
    max_steps: int | None = None            # optimizer steps; overrides epochs when set
    batch_size: int = 8                     # examples per micro-batch per process
    grad_accum: int = 1                     # micro-batches per optimizer step

    # optimizer and schedule
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1               # cosine floor, as a fraction of learning_rate
    max_grad_norm: float = 1.0              # 0 disables clipping

    # data order
    length_bucketing: bool = True           # batch examples of similar length together
    bucket_window: int = 50                 # batches per window that is sorted by length

    # numerics and device
    amp: str = "auto"
    base_dtype: str = "auto"                # storage of the frozen base: auto keeps the checkpoint's; bf16/fp16 need
                                            # the same amp (LoRA factors and optimizer state stay fp32)
    device: str = "auto"
    compile: bool = False
    seed: int = 1234

    # evaluation, checkpoints, stopping
    eval_every: int = 0                     # steps; 0 = only at the end
    eval_audio_every: int = 0               # steps between the task's periodic evals (e.g. audio); 0 = off
    best_metric: str = "val_loss"           # the metric that picks the best checkpoint and drives early stopping
    best_metric_goal: str = "auto"          # "min", "max", or "auto" (the task says which metrics go up)
    save_every: int = 500                   # steps; a checkpoint is also written at the end
    keep_last: int = 3                      # complete checkpoints kept besides the best one
    resume: bool = False
    early_stopping_patience: int = 0        # evaluations without improvement before stopping; 0 = off
    early_stopping_min_delta: float = 0.0
    max_nonfinite_in_a_row: int = 3         # stop after this many NaN/inf losses in a row

    # reporting
    log_every: int = 1
    tensorboard: bool = True
    plot: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.train_manifests, str):
            self.train_manifests = [self.train_manifests]
        if isinstance(self.val_manifests, str):
            self.val_manifests = [self.val_manifests]
        self.train_manifests, weights = _split_manifest_entries(self.train_manifests)
        if any(w is not None for w in weights):
            if self.train_weights is not None:
                raise ValueError("give train weights either inside train_manifests ({path, weight}) "
                                 "or as train_weights, not both")
            self.train_weights = [1.0 if w is None else float(w) for w in weights]
        self.val_manifests, _ = _split_manifest_entries(self.val_manifests)
        if not isinstance(self.task_options, dict):
            raise ValueError(f"TrainConfig: task_options must be a mapping of option: value, got {self.task_options!r}")
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field, what it holds and what it must be."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")

        need(self.amp in AMP_CHOICES, f"amp must be one of {AMP_CHOICES}, got {self.amp!r}")
        need(self.device in DEVICE_CHOICES, f"device must be one of {DEVICE_CHOICES}, got {self.device!r}")
        need(self.base_dtype in BASE_DTYPE_CHOICES,
             f"base_dtype must be one of {BASE_DTYPE_CHOICES}, got {self.base_dtype!r}")
        for name in ("batch_size", "grad_accum", "log_every", "bucket_window", "max_nonfinite_in_a_row"):
            need(int(getattr(self, name)) >= 1, f"{name} must be >= 1, got {getattr(self, name)!r}")
        need(self.best_metric_goal in ("auto", "min", "max"),
             f"best_metric_goal must be auto, min or max, got {self.best_metric_goal!r}")
        for name in ("save_every", "eval_every", "eval_audio_every", "keep_last", "warmup_steps",
                     "early_stopping_patience"):
            need(int(getattr(self, name)) >= 0, f"{name} must be >= 0, got {getattr(self, name)!r}")
        need(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps!r}")
        need(self.epochs > 0, f"epochs must be > 0, got {self.epochs!r}")
        need(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate!r}")
        need(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        need(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm!r}")
        if self.train_weights is not None:
            need(len(self.train_weights) == len(self.train_manifests),
                 f"train_weights has {len(self.train_weights)} entries for "
                 f"{len(self.train_manifests)} train_manifests: give one weight per manifest")
            need(all(w >= 0 for w in self.train_weights) and sum(self.train_weights) > 0,
                 f"train_weights must be >= 0 with a positive sum, got {self.train_weights!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; known keys are {sorted(known)} "
                             "(see configs/lora_finetune_example.yaml)")
        return cls(**d)


def _split_manifest_entries(entries: list[Any]) -> tuple[list[str], list[float | None]]:
    """Manifest entries are a path or {path: ..., weight: ...}; return the paths and the weights (None = unset)."""
    paths, weights = [], []
    for e in entries:
        if isinstance(e, dict):
            if "path" not in e or set(e) - {"path", "weight"}:
                raise ValueError(f"manifest entry {e!r}: expected a path or {{path: ..., weight: ...}}")
            paths.append(str(e["path"]))
            weights.append(e.get("weight"))
        else:
            paths.append(str(e))
            weights.append(None)
    return paths, weights


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config (flat keys, as in TrainConfig) and apply overrides whose value is not None."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of training config keys, got {type(loaded).__name__}")
        data.update(loaded or {})
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    return TrainConfig.from_dict(data)
