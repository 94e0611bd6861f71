"""Objective scores of a voice adapter on held-out data: validation loss, mel-code accuracy, perplexity."""
from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from indextts_integration.gpt_loss import GPTBatch, gpt_forward
from indextts_integration.training import collate, manifest_examples


@torch.no_grad()
def manifest_metrics(gpt: nn.Module, manifest: str | os.PathLike, batch_size: int = 8,
                     text_weight: float = 0.2, mel_weight: float = 0.8) -> dict[str, Any]:
    """Loss, mel accuracy and mel perplexity of the model's *current* voice over every row of a manifest."""
    rows = manifest_examples(manifest, 0)
    was_training = gpt.training
    gpt.eval()
    device = next(gpt.parameters()).device
    loss_sum = mel_loss_sum = 0.0
    correct = count = n = 0
    try:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            batch = GPTBatch(**collate(chunk)).to(device)
            out = gpt_forward(gpt, batch, text_weight, mel_weight)
            loss_sum += out.loss.item() * len(chunk)
            mel_loss_sum += out.mel_loss.item() * int(out.mel_count)
            correct, count, n = correct + int(out.mel_correct), count + int(out.mel_count), n + len(chunk)
    finally:
        gpt.train(was_training)
    mel_ce = mel_loss_sum / max(count, 1)
    return {"val_loss": loss_sum / max(n, 1), "mel_accuracy": correct / max(count, 1),
            "mel_perplexity": math.exp(min(mel_ce, 50.0)), "utterances": n}
