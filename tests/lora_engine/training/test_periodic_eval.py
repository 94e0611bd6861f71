"""The generic periodic-eval hook of the training loop (Task.periodic_eval + eval_audio_every + best_metric),
with the synthetic task: metrics logged, the best checkpoint chosen by the chosen metric, early stopping, resume."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from lora_engine.training import train
from lora_engine.training.checkpoint import best_checkpoint, list_checkpoints, read_meta
from lora_engine.training.metrics import read_metrics
from lora_engine.training import synthetic
from .conftest import lora_tensors, small_config

SCORES = {2: 0.2, 4: 0.9, 6: 0.4, 8: 0.3}  # "speaker similarity" by step: best at step 4


def _task(calls: list):
    def periodic_eval(model, step):
        calls.append((step, model.training, torch.is_grad_enabled()))
        return {"similarity": SCORES[step], "other": -step}

    return dataclasses.replace(synthetic.make_task(), periodic_eval=periodic_eval, higher_is_better=("similarity",))


def test_best_checkpoint_is_chosen_by_the_periodic_metric(tmp_path):
    calls: list = []
    cfg = small_config(tmp_path, max_steps=8, eval_every=0, eval_audio_every=2, save_every=0, keep_last=1,
                       best_metric="similarity")
    train(cfg, _task(calls))
    assert calls == [(s, False, False) for s in (2, 4, 6, 8)]  # eval mode, no grad, every 2 steps
    lines = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "similarity" in r]
    assert [(r["step"], r["similarity"], r["other"]) for r in lines] == [(s, SCORES[s], -s) for s in SCORES]
    assert [r["best_similarity"] for r in lines] == [0.2, 0.9, 0.9, 0.9]
    best = best_checkpoint(tmp_path / "checkpoints")
    assert best is not None and best.name == "step-00000004"
    assert read_meta(best)["similarity"] == 0.9 and read_meta(best)["is_best"]
    # pruning keeps the best by similarity (not the last by loss) and adapter_best is that checkpoint's adapter
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000004", "step-00000008"]
    ref = lora_tensors(best)
    assert all(torch.equal(v, lora_tensors(tmp_path / "adapter_best.safetensors")[k]) for k, v in ref.items())


def test_goal_min_and_early_stopping_on_the_periodic_metric(tmp_path):
    cfg = small_config(tmp_path, max_steps=8, eval_audio_every=2, save_every=0, best_metric="similarity",
                       best_metric_goal="min", early_stopping_patience=2)
    result = train(cfg, _task([]))
    # minimising: 0.2 at step 2 is never beaten, so two evals later (step 6) the run stops
    assert result.stop_reason == "early_stopping" and result.step == 6
    assert best_checkpoint(tmp_path / "checkpoints").name == "step-00000002"


def test_val_loss_still_tracked_when_another_metric_picks_the_best(tmp_path):
    cfg = small_config(tmp_path, max_steps=8, eval_every=4, eval_audio_every=2, best_metric="similarity")
    result = train(cfg, _task([]))
    vals = [r["val_loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "val_loss" in r]
    assert len(vals) == 2 and result.best_val_loss == pytest.approx(min(vals))


def test_resume_keeps_the_best_score(tmp_path):
    cfg = small_config(tmp_path, max_steps=4, eval_audio_every=2, save_every=2, best_metric="similarity")
    train(cfg, _task([]))
    train(dataclasses.replace(cfg, max_steps=8, resume=True), _task([]))
    lines = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "similarity" in r]
    assert [r["best_similarity"] for r in lines] == [0.2, 0.9, 0.9, 0.9]  # 0.9 of step 4 survived the resume
    assert best_checkpoint(tmp_path / "checkpoints").name == "step-00000004"


def test_misconfigured_best_metric_is_refused_with_advice(tmp_path):
    with pytest.raises(ValueError, match="set eval_audio_every"):
        train(small_config(tmp_path, max_steps=2, best_metric="similarity"), _task([]))
    with pytest.raises(ValueError, match="has no periodic eval"):
        train(small_config(tmp_path, max_steps=2, eval_audio_every=1))
    with pytest.raises(KeyError, match="not among the periodic eval's metrics"):
        train(small_config(tmp_path, max_steps=2, eval_audio_every=2, best_metric="nope"), _task([]))
