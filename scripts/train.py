#!/usr/bin/env python
"""Train a LoRA adapter.

With no --model-dir and no manifests it trains the embedded default: where IndexTTS2 (indextts2-cli) is
installed, a tiny IndexTTS2 checkpoint + a demo voice (made on first use and cached, ~20 s; then ~30 steps on a
CPU in seconds); elsewhere a synthetic GPT-2 demo.

Examples:
  python scripts/train.py --output-dir runs/demo                     # the embedded default
  python scripts/train.py --config configs/lora_finetune_example.yaml --model-dir checkpoints/ \\
      --train-manifest data/train_manifest.jsonl --val-manifest data/val_manifest.jsonl
  python scripts/train.py --config run.yaml --resume                 # continue from the newest checkpoint
  torchrun --nproc_per_node=4 scripts/train.py --config run.yaml     # data parallel (NCCL on GPUs, gloo on CPU)
  python scripts/train.py --model-dir checkpoints/ --train-manifest ... --task-option mel_weight=0.9 \
      --task-option gradient_checkpointing=true                      # IndexTTS2 task options (see below)

Settings come from the dataclass defaults, then --config YAML, then the flags given here (flags win).

IndexTTS2 task options (--task-option KEY=VALUE, or task_options: in the YAML):
  text_weight (0.2), mel_weight (0.8)   loss = text_weight * CE(text) + mel_weight * CE(mel codes)
  gpt_dropout (0.0)                     dropout inside the GPT blocks while training (upstream trains with 0.1)
  gradient_checkpointing (false)        non-reentrant checkpointing of the GPT blocks, to save memory
  learn_speaker_latent (false)          also learn one 32 x model_dim speaker latent, saved in the adapter
  max_tokens (0)                        skip examples longer than this many text + code tokens (0 = keep all)
  pad_to_multiple (64)                  on GPUs, pad each batch (masked, exact) to a length that is a multiple
                                        of this, so that kernel shapes repeat (0 = off)
  eval_reference_audio, eval_texts      with --eval-audio-every N: synthesize eval_texts every N steps and score
  eval_prompt_audio, eval_reference_text  speaker similarity to eval_reference_audio; pick the best checkpoint
  eval_max_mel_tokens (600)             with --best-metric speaker_similarity (indextts_integration/audio_eval.py)
Target presets for --lora-target-modules: gpt-attn-mlp (default), gpt-attn, and +heads / +embeddings suffixes.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lora_engine.training import NonFiniteLossError, TrainConfig, load_config, load_task, train  # noqa: E402
from lora_engine.training.config import AMP_CHOICES, BASE_DTYPE_CHOICES, DEVICE_CHOICES  # noqa: E402

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
    g.add_argument("--task-option", dest="task_option", action="append", metavar="KEY=VALUE",
                   help="a task setting (value read as YAML: 0.9, true, text); repeat for several; "
                        "IndexTTS2's are listed above")

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
    g.add_argument("--adam-beta1", type=float, help="AdamW beta1 (default 0.9)")
    g.add_argument("--adam-beta2", type=float, help="AdamW beta2 (default 0.999)")
    g.add_argument("--adam-eps", type=float, help="AdamW epsilon (default 1e-8)")

    g = p.add_argument_group("device and numerics")
    g.add_argument("--device", choices=DEVICE_CHOICES, help="auto picks cuda, xpu, mps, then cpu")
    g.add_argument("--amp", choices=AMP_CHOICES, help="mixed precision: bf16 autocast, fp16 with GradScaler, "
                                                      "none = fp32; auto = bf16 on GPUs that have it, fp32 on CPU")
    g.add_argument("--base-dtype", choices=BASE_DTYPE_CHOICES,
                   help="storage of the frozen base weights: auto keeps the checkpoint's (fp32 for IndexTTS2); bf16 "
                        "halves them (needs --amp bf16; the LoRA factors stay fp32)")
    g.add_argument("--compile", action=B, help="torch.compile the model (first steps are slow while it compiles)")
    g.add_argument("--seed", type=int, help="seed for weights init, data order and dropout")

    g = p.add_argument_group("evaluation, checkpoints, stopping")
    g.add_argument("--eval-every", type=int, help="validate every N steps (0 = only at the end)")
    g.add_argument("--eval-audio-every", type=int,
                   help="run the task's periodic eval every N steps (IndexTTS2: synthesize the eval_texts and "
                        "score speaker similarity; needs the eval_* task options); 0 = off")
    g.add_argument("--best-metric", help="metric that picks adapter_best.safetensors and drives early stopping: "
                                         "val_loss (default) or a periodic eval metric, e.g. speaker_similarity")
    g.add_argument("--best-metric-goal", choices=("auto", "min", "max"),
                   help="whether --best-metric should go down or up (auto: the task knows its metrics)")
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


def parse_task_options(items: list[str] | None) -> dict[str, Any]:
    """["mel_weight=0.9", "gradient_checkpointing=true"] -> {"mel_weight": 0.9, "gradient_checkpointing": True}."""
    import yaml

    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"error: --task-option {item!r}: expected KEY=VALUE, e.g. --task-option mel_weight=0.9")
        options[key.strip()] = yaml.safe_load(value)
    return options


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, str]:
    """Dataclass defaults < the task's suggestions < --config YAML < flags. Returns the config and the task ref."""
    skip = {"config", "task_option"}
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    base = load_config(args.config, overrides)
    options = parse_task_options(getattr(args, "task_option", None))
    if options:
        base = TrainConfig.from_dict({**base.to_dict(), "task_options": {**base.task_options, **options}})
    if not base.task and not base.model_dir and not base.train_manifests:
        base = _with_embedded_default(base)
    ref = base.task or (INDEXTTS_TASK if base.model_dir else SYNTHETIC_TASK)
    if not base.task and not base.model_dir and base.train_manifests:
        print("[train] no --model-dir: reading the manifests with the synthetic task "
              "(lines like {\"tokens\": [...]})", file=sys.stderr)
    return base, ref


def _with_embedded_default(cfg: TrainConfig) -> TrainConfig:
    """The config pointed at the embedded IndexTTS2 default (made on first use), when IndexTTS2 imports here."""
    try:
        from indextts_integration.embedded import embedded_default, upstream_importable
    except ImportError:
        return cfg
    if not upstream_importable():
        return cfg
    found = embedded_default(progress=cfg.progress)
    print(f"[train] no --model-dir and no manifests: training on the embedded default (tiny IndexTTS2 "
          f"checkpoint {found.model_dir} + demo voice)", file=sys.stderr)
    return TrainConfig.from_dict({**cfg.to_dict(), "model_dir": str(found.model_dir),
                                  "train_manifests": [str(found.train_manifest)],
                                  "val_manifests": cfg.val_manifests or [str(found.val_manifest)]})


def _is_embedded_default(cfg: TrainConfig) -> bool:
    if not cfg.model_dir:
        return False
    from indextts_integration.embedded import embedded_root

    return Path(cfg.model_dir) == embedded_root() / "checkpoints"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg, ref = resolve_config(args)
    task = load_task(ref, cfg)
    suggestions = dict(task.suggested_config or {})
    if _is_embedded_default(cfg):
        from indextts_integration.embedded import SUGGESTED_CONFIG

        suggestions.update(SUGGESTED_CONFIG)
    if suggestions:
        explicit = set(_yaml_keys(args.config)) | {k for k, v in vars(args).items() if v is not None}
        if "epochs" in explicit:
            explicit.add("max_steps")  # an explicit run length wins over a suggested one
        suggested = {k: v for k, v in suggestions.items() if k not in explicit}
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


def _exit_now(rc: int) -> None:
    """End a torchrun worker without interpreter teardown. Trap (torch 2.x gloo): the gloo backend's C++ worker
    threads can outlive destroy_process_group() and be torn down during interpreter finalization, where one of
    them aborts the process ("terminate called without an active exception", SIGABRT) after a run that finished
    and wrote all its files; torchrun then reports the whole job failed. Every file is closed and written
    atomically by now, so flush the streams and leave at once."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_now(code)
    sys.exit(code)
