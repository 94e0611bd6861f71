#!/usr/bin/env python
"""Train a LoRA adapter. With no --model-dir and no manifests it trains the embedded synthetic GPT-2 demo.

Examples:
  python scripts/train.py --output-dir runs/demo                     # synthetic demo, a few seconds on a CPU
  python scripts/train.py --config configs/lora_finetune_example.yaml --model-dir checkpoints/ \\
      --train-manifest data/train_manifest.jsonl --val-manifest data/val_manifest.jsonl
  python scripts/train.py --config run.yaml --resume                 # continue from the newest checkpoint
  torchrun --nproc_per_node=4 scripts/train.py --config run.yaml     # data parallel (NCCL on GPUs, gloo on CPU)

Settings come from the dataclass defaults, then --config YAML, then the flags given here (flags win).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lora_engine.training import NonFiniteLossError, TrainConfig, load_config, load_task, train  # noqa: E402
from lora_engine.training.config import AMP_CHOICES, DEVICE_CHOICES  # noqa: E402

SYNTHETIC_TASK = "lora_engine.training.synthetic:make_task"
INDEXTTS_TASK = "indextts_integration.training:make_task"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=None)
    B = argparse.BooleanOptionalAction
    g = p.add_argument_group("what to train")
    g.add_argument("--config", help="YAML file of settings (keys as in configs/lora_finetune_example.yaml)")
    g.add_argument("--model-dir", help="model checkpoint directory (IndexTTS2: its checkpoints/ folder); "
                                       "selects the IndexTTS2 task unless --task is given")
    g.add_argument("--task", help=f"'module:function' returning a lora_engine.training.Task; default "
                                  f"{INDEXTTS_TASK} with --model-dir, else {SYNTHETIC_TASK}")
    g.add_argument("--train-manifest", dest="train_manifests", action="append", metavar="JSONL",
                   help="training manifest (JSONL, one example a line); repeat for several datasets")
    g.add_argument("--train-weights", type=float, nargs="+", metavar="W",
                   help="sampling weight per --train-manifest, in the same order (default: by dataset size)")
    g.add_argument("--val-manifest", dest="val_manifests", action="append", metavar="JSONL",
                   help="validation manifest (JSONL); repeat to use several")
    g.add_argument("--output-dir", help="where checkpoints, adapter, metrics.jsonl and the loss curve go")
    g.add_argument("--adapter-name", help="name of the adapter being trained (stored in the adapter file)")

    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-rank", type=int, help="rank r of every LoRA pair")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha; the update is scaled by alpha / r")
    g.add_argument("--lora-dropout", type=float, help="dropout on the LoRA input during training")
    g.add_argument("--lora-target-modules", nargs="+", metavar="GLOB",
                   help="module path globs to adapt ('*' = one path component); default: the task's preset")

    g = p.add_argument_group("length and batch")
    g.add_argument("--epochs", type=float, help="passes over the training data (ignored when --max-steps is set)")
    g.add_argument("--max-steps", type=int, help="optimizer steps to train for; overrides --epochs")
    g.add_argument("--batch-size", type=int, help="examples per micro-batch per process")
    g.add_argument("--grad-accum", type=int, help="micro-batches accumulated per optimizer step; the global "
                                                  "batch is batch-size x grad-accum x processes")
    g.add_argument("--length-bucketing", action=B, help="batch examples of similar length together")
    g.add_argument("--bucket-window", type=int, help="batches per window that is sorted by length")

    g = p.add_argument_group("optimizer")
    g.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float, help="peak AdamW learning rate")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay on the LoRA parameters")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps before the cosine decay")
    g.add_argument("--min-lr-ratio", type=float, help="cosine floor as a fraction of the learning rate")
    g.add_argument("--max-grad-norm", type=float, help="clip the gradient norm to this; 0 disables clipping")

    g = p.add_argument_group("device and numerics")
    g.add_argument("--device", choices=DEVICE_CHOICES, help="auto picks cuda, xpu, mps, then cpu")
    g.add_argument("--amp", choices=AMP_CHOICES, help="mixed precision: bf16 autocast, fp16 with GradScaler, "
                                                      "none = fp32; auto = bf16 on GPUs that have it, fp32 on CPU")
    g.add_argument("--compile", action=B, help="torch.compile the model (first steps are slow while it compiles)")
    g.add_argument("--seed", type=int, help="seed for weights init, data order and dropout")

    g = p.add_argument_group("evaluation, checkpoints, stopping")
    g.add_argument("--eval-every", type=int, help="validate every N steps (0 = only at the end)")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps (also at the end and on a new best)")
    g.add_argument("--keep-last", type=int, help="checkpoints kept besides the best by validation loss")
    g.add_argument("--resume", action=B, help="continue from the newest complete checkpoint in --output-dir")
    g.add_argument("--early-stopping-patience", type=int,
                   help="stop after this many evaluations without val_loss improvement (0 = never)")
    g.add_argument("--early-stopping-min-delta", type=float, help="improvement smaller than this does not count")
    g.add_argument("--max-nonfinite-in-a-row", type=int, help="stop after this many NaN/inf losses in a row")

    g = p.add_argument_group("reporting")
    g.add_argument("--log-every", type=int, help="write a metrics.jsonl line every N steps")
    g.add_argument("--tensorboard", action=B, help="also write TensorBoard events (when tensorboard is installed)")
    g.add_argument("--plot", action=B, help="write loss_curve.png at each evaluation")
    g.add_argument("--progress", action=B, help="show a progress bar")
    return p


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, str]:
    """Dataclass defaults < the task's suggestions < --config YAML < flags. Returns the config and the task ref."""
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    base = load_config(args.config, overrides)
    ref = base.task or (INDEXTTS_TASK if base.model_dir else SYNTHETIC_TASK)
    if not base.task and not base.model_dir and base.train_manifests:
        print("[train] no --model-dir: reading the manifests with the synthetic task "
              "(lines like {\"tokens\": [...]})", file=sys.stderr)
    return base, ref


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg, ref = resolve_config(args)
    task = load_task(ref, cfg)
    if task.suggested_config:
        explicit = set(_yaml_keys(args.config)) | {k for k, v in vars(args).items() if v is not None}
        if "epochs" in explicit:
            explicit.add("max_steps")  # an explicit run length wins over a suggested one
        suggested = {k: v for k, v in task.suggested_config.items() if k not in explicit}
        if suggested:
            cfg = TrainConfig.from_dict({**cfg.to_dict(), **suggested})
    try:
        result = train(cfg, task)
    except NonFiniteLossError as e:
        print(f"[train] {e}", file=sys.stderr)
        return 3
    if result.adapter_path is not None:
        best = f", best val_loss {result.best_val_loss:.4f}" if result.best_val_loss is not None else ""
        print(f"[train] done at step {result.step} ({result.stop_reason}): loss {result.loss}{best}; "
              f"adapter {result.adapter_path}", file=sys.stderr)
    return 0


def _yaml_keys(path: str | None) -> list[str]:
    if path is None:
        return []
    import yaml

    return list((yaml.safe_load(Path(path).read_text()) or {}).keys())


if __name__ == "__main__":
    sys.exit(main())
