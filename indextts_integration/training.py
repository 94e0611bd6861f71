"""The IndexTTS2 training task for lora_engine's loop: UnifiedVoice + prepared manifests + the masked loss.

scripts/train.py --model-dir DIR selects it. Task options (`task_options:` in the YAML, or
`--task-option key=value`):
    text_weight (0.2), mel_weight (0.8)   loss = text_weight * CE(text) + mel_weight * CE(mel)
    gpt_dropout (0.0)                     dropout inside the GPT blocks while training (upstream: 0.1)
    gradient_checkpointing (false)        non-reentrant checkpointing of the GPT blocks (saves memory)
    learn_speaker_latent (false)          also learn one 32 x D speaker latent, saved in the adapter
    max_tokens (0)                        drop examples longer than this many text + code tokens (0 = keep all)
    pad_to_multiple (64)                  on GPUs, pad each batch (masked, exact) to a length that is a multiple
                                          of this, so that kernel shapes repeat (0 = off)
    eval_reference_audio, eval_texts, eval_prompt_audio, eval_reference_text, eval_max_mel_tokens
                                          the periodic audio eval of --eval-audio-every (audio_eval.py)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from indextts_integration import model_dir as md
from indextts_integration.gpt_loss import GPTBatch, fix_gradient_checkpointing, gpt_forward, set_gpt_dropout
from indextts_integration.targets import DEFAULT_PRESET, expand_targets, preset_targets
from lora_engine.training.config import TrainConfig
from lora_engine.training.data import TrainData, load_manifest
from lora_engine.training.task import Task

DEFAULTS = {"text_weight": 0.2, "mel_weight": 0.8, "gpt_dropout": 0.0, "gradient_checkpointing": False,
            "learn_speaker_latent": False, "max_tokens": 0, "pad_to_multiple": 64, "eval_reference_audio": None,
            "eval_texts": None, "eval_prompt_audio": None, "eval_reference_text": None, "eval_max_mel_tokens": 600}
SPEAKER_LATENT = "speaker_latent"


def task_options(config: TrainConfig) -> dict[str, Any]:
    given = dict(getattr(config, "task_options", None) or {})
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown IndexTTS2 task option(s) {unknown}; known: {sorted(DEFAULTS)}")
    return {**DEFAULTS, **given}


def build_model(config: TrainConfig) -> nn.Module:
    """UnifiedVoice from --model-dir with gpt.pth loaded strictly (before post_init, as IndexTTS2 does)."""
    opts = task_options(config)
    model = md.load_unified_voice(_model_dir(config))
    fix_gradient_checkpointing(model, enabled=bool(opts["gradient_checkpointing"]))
    set_gpt_dropout(model, float(opts["gpt_dropout"]))
    if opts["learn_speaker_latent"]:
        # Registered on the model so the loop trains, checkpoints and resumes it like any trainable tensor.
        model.register_parameter(SPEAKER_LATENT, nn.Parameter(torch.zeros(32, model.model_dim)))
    return model


def _model_dir(config: TrainConfig) -> str:
    if not config.model_dir:
        raise ValueError("the IndexTTS2 task needs --model-dir (your IndexTTS2 checkpoints/ directory)")
    return config.model_dir


def manifest_examples(manifest: str | os.PathLike, max_tokens: int) -> list[dict[str, Any]]:
    """Manifest rows with absolute feature paths (they are stored relative to the manifest's folder)."""
    root = Path(manifest).parent
    rows = []
    for row in load_manifest(manifest):
        missing = [k for k in ("text_ids", "features", "prompt_features", "n_codes") if k not in row]
        if missing:
            raise ValueError(f"{manifest}: row {row.get('id')!r} lacks {missing}; make manifests with "
                             "scripts/prepare_dataset.py")
        if max_tokens and len(row["text_ids"]) + row["n_codes"] > max_tokens:
            continue
        rows.append({**row, "features": str(root / row["features"]),
                     "prompt_features": str(root / row["prompt_features"])})
    return rows


def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Pad text ids and codes; speaker latent and emotion vector come from each row's paired prompt."""
    feats = [torch.load(e["features"], map_location="cpu", weights_only=True) for e in examples]
    prompts = [torch.load(e["prompt_features"], map_location="cpu", weights_only=True) for e in examples]
    B = len(examples)
    lt, lm = max(len(e["text_ids"]) for e in examples), max(int(f["codes"].numel()) for f in feats)
    text, codes = torch.ones(B, lt, dtype=torch.long), torch.zeros(B, lm, dtype=torch.long)
    for i, (e, f) in enumerate(zip(examples, feats)):
        text[i, :len(e["text_ids"])] = torch.tensor(e["text_ids"], dtype=torch.long)
        codes[i, :f["codes"].numel()] = f["codes"].long().flatten()
    return {"conditioning": torch.stack([p["cond_latent"].float() for p in prompts]),
            "emo_vec": torch.stack([p["emo_vec"].float().flatten() for p in prompts]),
            "text_ids": text, "text_lengths": torch.tensor([len(e["text_ids"]) for e in examples]),
            "codes": codes, "code_lengths": torch.tensor([int(f["codes"].numel()) for f in feats])}


def load_data(config: TrainConfig) -> tuple[TrainData, list[dict[str, Any]] | None]:
    opts = task_options(config)
    if not config.train_manifests:
        raise ValueError("the IndexTTS2 task needs --train-manifest (train_manifest.jsonl from "
                         "scripts/prepare_dataset.py)")
    datasets = [manifest_examples(m, int(opts["max_tokens"])) for m in config.train_manifests]
    for path, rows in zip(config.train_manifests, datasets):
        if not rows:
            raise ValueError(f"{path}: no usable examples (all longer than max_tokens={opts['max_tokens']}?)")
    val = [r for m in config.val_manifests for r in manifest_examples(m, int(opts["max_tokens"]))] or None
    lengths = [[len(r["text_ids"]) + int(r["n_codes"]) for r in rows] for rows in datasets]
    return TrainData(datasets, collate, config.train_weights, lengths), val


def make_loss_fn(config: TrainConfig):
    opts = task_options(config)
    text_w, mel_w = float(opts["text_weight"]), float(opts["mel_weight"])
    pad_to = int(opts["pad_to_multiple"])

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        latent = getattr(model, SPEAKER_LATENT, None)
        if latent is not None:  # the learned voice replaces the prompt's latent
            batch = {**batch, "conditioning": latent.unsqueeze(0).expand_as(batch["conditioning"])}
        # Trap (measured on an H200, benchmarks/results/h200x2-2026-11-29-ddp-v2.json against -v3.json): a step
        # whose sequence length had not occurred before took ~0.1 s more, and with lengths that vary nearly every
        # step's is new. Padding to a multiple of 64 leaves few shapes: median step 208 -> 102 ms. The cost was
        # mostly cuDNN attention's plan per length (shape_setup.json), which the loop now avoids
        # (devices.training_attention); padding still lets GEMM shapes repeat. CPUs pay no setup: not padded.
        multiple = pad_to if batch["codes"].is_cuda else 0
        return gpt_forward(model, GPTBatch(**batch), text_w, mel_w, multiple).loss

    return loss_fn


def _speaker_latent(model: nn.Module) -> dict[str, nn.Parameter]:
    latent = getattr(model, SPEAKER_LATENT, None)
    return {SPEAKER_LATENT: latent} if latent is not None else {}


def make_task(config: TrainConfig) -> Task:
    """The Task scripts/train.py uses with --model-dir; preset names work in lora_target_modules."""
    if config.lora_target_modules:
        config.lora_target_modules = expand_targets(config.lora_target_modules)
    return Task("indextts2-unifiedvoice", build_model, load_data, make_loss_fn(config),
                preset_targets(DEFAULT_PRESET),
                suggested_config={"learning_rate": 2e-4, "batch_size": 4, "warmup_steps": 20, "eval_every": 100,
                                  "save_every": 200},
                extra_trainables=_speaker_latent, periodic_eval=_periodic_eval(config),
                higher_is_better=("speaker_similarity", "mel_accuracy"))


def _periodic_eval(config: TrainConfig):
    """The audio eval of --eval-audio-every (None when off, so nothing heavy is built)."""
    if not config.eval_audio_every:
        return None
    from indextts_integration.audio_eval import PeriodicAudioEval

    return PeriodicAudioEval(_model_dir(config), task_options(config), config.output_dir, config.seed)
