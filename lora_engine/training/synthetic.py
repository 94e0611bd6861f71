"""The embedded default task: a tiny GPT-2 learns a fixed next-token rule with LoRA, in seconds on a CPU.

Each sequence follows x[t+1] = (5 * x[t] + 3) mod VOCAB from a random start, so the loss can go well below the
uniform log(VOCAB) only by learning. Manifests (JSONL lines like {"tokens": [3, 18, 45]}) replace the generated
data when given, which is how the generic manifest, weighting and bucketing path is exercised without IndexTTS2.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .data import TrainData, load_manifest
from .task import Task

VOCAB = 48
MIN_LEN, MAX_LEN = 8, 32
INIT_STD = 0.2  # GPT-2 uses 0.02; the tied output head stays frozen, so it must be large enough to be confident
TARGETS = ["transformer.h.*.attn.c_attn", "transformer.h.*.attn.c_proj", "transformer.h.*.mlp.c_fc",
           "transformer.h.*.mlp.c_proj"]


def build_model(config: TrainConfig | None = None) -> nn.Module:
    """GPT2LMHeadModel, 2 layers of width 32, random weights (the caller seeds torch), dropout off."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=INIT_STD,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def make_sequences(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n):
        x = int(rng.integers(VOCAB))
        seq = [x]
        for _ in range(int(rng.integers(MIN_LEN, MAX_LEN + 1)) - 1):
            x = (5 * x + 3) % VOCAB
            seq.append(x)
        seqs.append(seq)
    return seqs


def collate(examples: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-pad with 0; labels are -100 on padding."""
    width = max(len(e) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e)] = torch.tensor(e)
        mask[i, :len(e)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the non-padding positions."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=-100)


def _tokens(records: list[dict[str, Any]], path: str) -> list[list[int]]:
    out = []
    for k, r in enumerate(records):
        toks = r.get("tokens")
        if not isinstance(toks, list) or len(toks) < 2 or not all(isinstance(t, int) and 0 <= t < VOCAB
                                                                  for t in toks):
            raise ValueError(f"{path}: example {k} needs 'tokens': a list of >= 2 ints in [0, {VOCAB})")
        out.append(toks)
    return out


def load_data(config: TrainConfig) -> tuple[TrainData, list[list[int]] | None]:
    if config.train_manifests:
        datasets = [_tokens(load_manifest(p), p) for p in config.train_manifests]
    else:
        datasets = [make_sequences(512, seed=config.seed)]
    if config.val_manifests:
        val = [t for p in config.val_manifests for t in _tokens(load_manifest(p), p)]
    elif not config.train_manifests:
        val = make_sequences(64, seed=config.seed + 1)
    else:
        val = None
    lengths = [[len(e) for e in d] for d in datasets]
    return TrainData(datasets, collate, config.train_weights, lengths), val


def make_task(config: TrainConfig | None = None) -> Task:
    return Task("synthetic-gpt2", build_model, load_data, loss_fn, list(TARGETS),
                suggested_config={"learning_rate": 1e-2, "batch_size": 16, "max_steps": 200, "eval_every": 50,
                                  "save_every": 50, "warmup_steps": 10})
