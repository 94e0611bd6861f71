"""train(): the whole LoRA training loop in one function, read top to bottom (after nanoGPT's train.py).

data -> forward -> loss -> backward -> step -> log -> eval -> checkpoint. Model-specific code lives in the Task.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import synthetic
from .. import train_casts
from .checkpoint import (ADAPTER_FILE, STATE_FILE, best_checkpoint, clean_leftovers, latest_checkpoint,
                         list_checkpoints, load_state, prune_checkpoints, rng_state, set_rng_state,
                         write_checkpoint)
from .config import BASE_DTYPES, TrainConfig
from .data import BatchStream, fixed_batches
from .devices import AmpRecipe, amp_recipe, peak_memory_gb, training_attention
from .distributed import (DistInfo, all_gather_objects, all_reduce_sum, barrier, broadcast_object,
                          cleanup_distributed, setup_distributed)
from .metrics import PLOT_FILE, MetricsLog, plot_loss_curve
from .schedule import warmup_cosine_scheduler
from .task import Task

FINAL_ADAPTER = "adapter.safetensors"
BEST_ADAPTER = "adapter_best.safetensors"
# Config keys that may change between a run and its resume without changing what is computed.
_RESUME_FREE_KEYS = {"resume", "max_steps", "epochs", "progress", "tensorboard", "plot", "log_every",
                     "save_every", "eval_every", "eval_audio_every", "keep_last", "output_dir", "device", "compile"}


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss was NaN/inf too many steps in a row."""


@dataclasses.dataclass
class TrainResult:
    step: int
    loss: float | None              # last finite training loss
    val_loss: float | None          # last validation loss
    best_val_loss: float | None
    adapter_path: Path | None       # final adapter (rank 0 only; None elsewhere)
    last_checkpoint: Path | None
    nonfinite_skipped: int
    stop_reason: str                # "max_steps" or "early_stopping"


def train(config: TrainConfig, task: Task | None = None) -> TrainResult:
    """Train a LoRA adapter for `task` (default: the synthetic GPT-2 task) as `config` says. Under torchrun every
    process calls this; rank 0 alone writes files. Raises NonFiniteLossError after too many NaN/inf losses."""
    from lora_engine import LoRASpec, inject_lora
    from lora_engine.adapter_io import base_fingerprint, save_adapter

    cfg = config
    task = task or synthetic.make_task(cfg)
    best_goal = _best_goal(cfg, task)
    periodic = task.periodic_eval if cfg.eval_audio_every else None
    dist = setup_distributed(cfg.device)
    device, main, world = dist.device, dist.is_main, dist.world_size
    amp = amp_recipe(device, cfg.amp)
    out_dir = Path(cfg.output_dir)
    ckpt_root = out_dir / "checkpoints"
    log: MetricsLog | None = None
    bar = None
    try:
        base_dtype = BASE_DTYPES[cfg.base_dtype]
        if base_dtype not in (None, torch.float32) and amp.dtype != base_dtype:
            raise ValueError(f"base_dtype {cfg.base_dtype} needs --amp {cfg.base_dtype} (here amp is {amp.name} on "
                             f"{device.type}): without autocast the {cfg.base_dtype} weights would meet fp32 inputs")

        # ---- output dir: refuse to mix a fresh run into an old one
        if main:
            out_dir.mkdir(parents=True, exist_ok=True)
            clean_leftovers(ckpt_root)
            if list_checkpoints(ckpt_root) and not cfg.resume:
                raise FileExistsError(f"{out_dir} already holds checkpoints of an earlier run: pass --resume to "
                                      "continue it, or choose a new --output-dir")
        barrier(dist)

        # ---- model: base weights, then LoRA; seeded alike on every rank (DDP also broadcasts rank 0's)
        torch.manual_seed(cfg.seed)
        model = task.build_model(cfg)
        spec = LoRASpec(target_modules=cfg.lora_target_modules or task.default_target_modules,
                        rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
        targets = inject_lora(model, spec, adapter=cfg.adapter_name)
        extras = task.extra_trainables(model) if task.extra_trainables else {}
        for p in extras.values():
            p.requires_grad_(True)
        if base_dtype is not None:
            _cast_frozen(model, base_dtype)
        model.to(device)
        # The base is frozen: hash it once here rather than in every save_adapter call (a second per save at
        # IndexTTS2 size).
        fingerprint = base_fingerprint(model, list(targets)) if main else None
        save = functools.partial(save_adapter, adapter=cfg.adapter_name, fingerprint=fingerprint)
        named_trainables = {n: p for n, p in model.named_parameters() if p.requires_grad}
        params = list(named_trainables.values())
        if not params:
            raise RuntimeError("no trainable parameters after inject_lora: check lora_target_modules")

        # ---- data
        train_data, val_examples = task.load_data(cfg)
        stream = BatchStream(train_data, cfg.batch_size, cfg.seed, world, dist.rank, cfg.bucket_window,
                             cfg.length_bucketing)
        micro_per_step = cfg.grad_accum * world
        max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * stream.batches_per_epoch / micro_per_step))
        val_batches = fixed_batches(val_examples, cfg.batch_size, world, dist.rank) if val_examples else []
        has_val = bool(val_examples)

        # ---- optimizer, schedule, loss scaler
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                                      fused=True if device.type == "cuda" else None)  # one kernel, not one per tensor
        scheduler = warmup_cosine_scheduler(optimizer, cfg.warmup_steps, max_steps, cfg.min_lr_ratio)
        scaler = amp.grad_scaler()

        # ---- resume from the newest complete checkpoint (rank 0 picks it, so all ranks agree)
        step, best_val, evals_since_best, nonfinite_total = 0, math.inf, 0, 0
        best_score = math.inf if best_goal == "min" else -math.inf  # of cfg.best_metric, which picks the best
        resume_from = broadcast_object(latest_checkpoint(ckpt_root) if cfg.resume and main else None, dist)
        if resume_from is not None:
            state = load_state(resume_from)
            _warn_config_drift(state["config"], cfg.to_dict(), main)
            with torch.no_grad():
                for name, value in state["trainables"].items():
                    if name not in named_trainables:
                        raise KeyError(f"{resume_from}: trainable {name!r} does not exist in this model; was the "
                                       "checkpoint made with other lora_target_modules or another task?")
                    named_trainables[name].copy_(value)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            stream.load_state_dict(state["data"])
            step, best_val = state["step"], state["best_val_loss"]
            best_score = state.get("best_score", best_val if cfg.best_metric == "val_loss" else best_score)
            evals_since_best, nonfinite_total = state["evals_since_best"], state["nonfinite_total"]
            rngs = state["rng"]
            set_rng_state(rngs[dist.rank] if dist.rank < len(rngs) else rngs[0])
            _say(main, f"resumed from {resume_from} at step {step}/{max_steps}")
        else:
            _seed_all(cfg.seed + dist.rank)  # per-rank dropout masks differ under DDP
            if cfg.resume:
                _say(main, f"--resume: no complete checkpoint in {ckpt_root}, starting from step 0")
        if main:
            (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

        # ---- wrap for data parallel and compile (both opt-in by environment / flag)
        # The wrappers go around model + loss, not the model alone: a task's loss may call submodules directly
        # (IndexTTS2's does: UnifiedVoice.forward is not its training forward), and DDP only arms its gradient
        # all-reduce, torch.compile only traces, inside the wrapped module's forward.
        train_model: nn.Module = TaskLoss(model, task.loss_fn)
        if world > 1:
            train_model = DistributedDataParallel(train_model,
                                                  device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile and amp.dtype is not None:  # the kept casts exist before tracing, so the graph reads them
            train_casts.prepare(model, amp.dtype)
        step_model = torch.compile(train_model) if cfg.compile else train_model

        log = MetricsLog(out_dir, enabled=main, tensorboard=cfg.tensorboard, resume_step=step)
        bar = _progress_bar(cfg.progress and main, step, max_steps)
        last_loss: float | None = None
        val_loss: float | None = None
        last_ckpt: Path | None = resume_from
        nonfinite_in_a_row = 0
        stop_reason = "max_steps"
        checked_gradients = False
        global_batch = cfg.batch_size * micro_per_step

        while step < max_steps:
            t0 = time.perf_counter()
            model.train()
            # ---- forward / backward over the accumulation micro-batches (DDP syncs grads on the last one)
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                batch = _to_device(stream.next_batch(), device)
                no_sync = world > 1 and micro < cfg.grad_accum - 1
                with train_model.no_sync() if no_sync else contextlib.nullcontext():
                    with amp.autocast(), training_attention(device):
                        loss = step_model(batch)
                    scaler.scale(loss / cfg.grad_accum).backward()
                loss_sum += loss.detach().float()
            if not checked_gradients:
                _check_gradients(named_trainables, world, main)
                checked_gradients = True
            step_loss = (all_reduce_sum(loss_sum / cfg.grad_accum, dist) / world).item()
            lr = scheduler.get_last_lr()[0]

            # ---- step: clip, update; a non-finite loss (or, without a scaler, gradient) skips the update
            grad_norm = math.nan
            finite = math.isfinite(step_loss)
            if finite:
                scaler.unscale_(optimizer)
                max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
                finite = math.isfinite(grad_norm) or amp.use_scaler  # fp16: GradScaler skips inf grads itself
            if finite:
                scaler.step(optimizer)
                scaler.update()
                nonfinite_in_a_row = 0
                last_loss = step_loss
            else:
                nonfinite_total += 1
                nonfinite_in_a_row += 1
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1

            # ---- log
            dt = time.perf_counter() - t0
            record: dict[str, Any] = {"step": step, "loss": step_loss, "lr": lr}
            if finite:
                record["grad_norm"] = grad_norm
            else:
                record.update(skipped=True, nonfinite_total=nonfinite_total)
            if amp.use_scaler:
                record["loss_scale"] = scaler.get_scale()
            record["samples_per_s"] = global_batch / dt
            record["step_time_s"] = dt
            if not finite or step % cfg.log_every == 0 or step == max_steps:
                log.log(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{global_batch / dt:.1f}")
            if nonfinite_in_a_row >= cfg.max_nonfinite_in_a_row:
                raise NonFiniteLossError(
                    f"stopping at step {step}: the loss was NaN/inf {nonfinite_in_a_row} steps in a row "
                    f"({nonfinite_total} skipped in all). Lower --learning-rate, use --amp bf16 or none instead of "
                    f"fp16, or check the data; the last good checkpoint is {last_ckpt}.")

            # ---- eval: val loss (all ranks, sharded) and the task's periodic eval (rank 0, e.g. audio samples);
            # cfg.best_metric among these scores picks the best checkpoint and drives early stopping
            scores: dict[str, float] = {}
            evaluated = has_val and bool((cfg.eval_every and step % cfg.eval_every == 0) or step == max_steps)
            if evaluated:
                val_loss = evaluate(model, val_batches, train_data.collate, task.loss_fn, amp, dist)
                scores["val_loss"] = val_loss
                if cfg.best_metric != "val_loss" and math.isfinite(val_loss):
                    best_val = min(best_val, val_loss)
            if periodic is not None and (step % cfg.eval_audio_every == 0 or step == max_steps):
                scores.update(run_periodic_eval(periodic, model, step, dist))
                if cfg.best_metric not in scores and cfg.best_metric != "val_loss":
                    raise KeyError(f"best_metric {cfg.best_metric!r} is not among the periodic eval's metrics "
                                   f"{sorted(scores)}: set best_metric to one of them")
            improved = False
            if cfg.best_metric in scores:
                improved = _improves(scores[cfg.best_metric], best_score, best_goal, cfg.early_stopping_min_delta)
                if improved:
                    best_score, evals_since_best = scores[cfg.best_metric], 0
                else:
                    evals_since_best += 1
                if cfg.best_metric == "val_loss":
                    best_val = best_score
            if scores:
                record = {"step": step, "loss": step_loss, "lr": lr, **scores}
                if evaluated:
                    record["best_val_loss"] = best_val if math.isfinite(best_val) else None
                if cfg.best_metric != "val_loss" and math.isfinite(best_score):
                    record[f"best_{cfg.best_metric}"] = best_score
                log.log(record)
                if main and cfg.plot:
                    plot_loss_curve(log.path, out_dir / PLOT_FILE)
                if cfg.early_stopping_patience and evals_since_best >= cfg.early_stopping_patience:
                    stop_reason = "early_stopping"
                    _say(main, f"early stopping at step {step}: no {cfg.best_metric} improvement in "
                               f"{evals_since_best} evals")

            # ---- checkpoint: every save_every steps, on a new best, and at the end
            done = step >= max_steps or stop_reason != "max_steps"
            if (cfg.save_every and step % cfg.save_every == 0) or improved or done:
                state = {
                    "step": step, "trainables": {n: p.detach().cpu().clone() for n, p in named_trainables.items()},
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "data": stream.state_dict(),
                    "best_val_loss": best_val, "best_score": best_score, "evals_since_best": evals_since_best,
                    "nonfinite_total": nonfinite_total, "config": cfg.to_dict(), "world_size": world,
                }
                # val_loss only when measured at this step; is_best marks the one that pruning keeps
                meta = {**scores, "val_loss": val_loss if evaluated else None, "train_loss": last_loss,
                        "is_best": improved}
                summary = _summary(cfg, task, amp, step, max_steps, last_loss, val_loss, best_val, world,
                                   nonfinite_total, stream)
                last_ckpt = save_checkpoint(ckpt_root, step, model, state, meta, summary, extras, dist, save,
                                            cfg.keep_last)
            if stop_reason != "max_steps":
                break

        # ---- peak device memory of every rank (one line in metrics.jsonl; on CPU torch keeps no count)
        peaks = all_gather_objects(peak_memory_gb(device), dist)
        if peaks[0] is not None:
            log.log({"step": step, "peak_memory_gb_per_rank": peaks})
            _say(main, "peak device memory per rank: " + ", ".join(f"{p:.2f} GB" for p in peaks))

        # ---- final artifacts: the adapter, the best adapter, the loss curve
        train_casts.release(model)  # the kept casts (a cast copy of every targeted weight) are of no use after training
        adapter_path = None
        if main:
            adapter_path = out_dir / FINAL_ADAPTER
            _check_finite(named_trainables)
            save(model, str(adapter_path),
                 training_summary=_summary(cfg, task, amp, step, max_steps, last_loss, val_loss, best_val,
                                           world, nonfinite_total, stream),
                 extra_tensors=_extra_tensors(extras))
            best = best_checkpoint(ckpt_root)
            if best is not None:
                tmp = out_dir / (BEST_ADAPTER + ".tmp")
                shutil.copyfile(best / ADAPTER_FILE, tmp)
                tmp.replace(out_dir / BEST_ADAPTER)
            if cfg.plot:
                plot_loss_curve(log.path, out_dir / PLOT_FILE)
        barrier(dist)
        return TrainResult(step, last_loss, val_loss, best_val if math.isfinite(best_val) else None,
                           adapter_path, last_ckpt, nonfinite_total, stop_reason)
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
        cleanup_distributed(dist)


class TaskLoss(nn.Module):
    """The model and the task's loss as one module: forward(batch) = loss_fn(model, batch)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def evaluate(model: nn.Module, batches: list[list[Any]], collate: Any, loss_fn: Any, amp: AmpRecipe,
             dist: DistInfo) -> float:
    """Mean validation loss over all examples of all ranks (each rank evaluates its shard of batches)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of loss * examples, examples]
    with torch.no_grad():
        for examples in batches:
            with amp.autocast(), training_attention(device):
                loss = loss_fn(model, _to_device(collate(examples), device))
            totals[0] += loss.double() * len(examples)
            totals[1] += len(examples)
    all_reduce_sum(totals, dist)
    model.train(was_training)
    return (totals[0] / totals[1]).item() if totals[1] > 0 else math.nan


def run_periodic_eval(periodic_eval: Callable[[nn.Module, int], dict[str, float]], model: nn.Module, step: int,
                      dist: DistInfo) -> dict[str, float]:
    """Collective: rank 0 runs the task's periodic eval on the model in eval mode without gradients; every rank
    gets its scores."""
    scores = None
    if dist.is_main:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                scores = {k: float(v) for k, v in periodic_eval(model, step).items()}
        finally:
            model.train(was_training)
    return broadcast_object(scores, dist)


def _best_goal(cfg: TrainConfig, task: Task) -> str:
    """"min" or "max" for cfg.best_metric; refuses a metric that nothing in this run will measure."""
    if cfg.best_metric != "val_loss" and not (cfg.eval_audio_every and task.periodic_eval is not None):
        raise ValueError(f"best_metric {cfg.best_metric!r} comes from the task's periodic eval: set eval_audio_every "
                         f"(--eval-audio-every N), or use best_metric val_loss"
                         + ("" if task.periodic_eval else f" (task {task.name} has no periodic eval)"))
    if cfg.eval_audio_every and task.periodic_eval is None:
        raise ValueError(f"eval_audio_every is set but task {task.name} has no periodic eval; set it to 0")
    if cfg.best_metric_goal != "auto":
        return cfg.best_metric_goal
    return "max" if cfg.best_metric in task.higher_is_better else "min"


def _improves(value: float, best: float, goal: str, min_delta: float) -> bool:
    if not math.isfinite(value):
        return False
    return value < best - min_delta if goal == "min" else value > best + min_delta


def save_checkpoint(root: Path, step: int, model: nn.Module, state: dict[str, Any], meta: dict[str, Any],
                    summary: dict[str, Any], extras: dict[str, nn.Parameter], dist: DistInfo,
                    save_adapter: Callable[..., Any], keep_last: int) -> Path:
    """Collective: gathers every rank's RNG state; rank 0 writes the checkpoint atomically and prunes old ones.
    `save_adapter(model, path, training_summary=..., extra_tensors=...)` writes the adapter file."""
    _check_finite({n: p for n, p in model.named_parameters() if p.requires_grad})
    state["rng"] = all_gather_objects(rng_state(), dist)
    path = root / f"step-{step:08d}"
    if dist.is_main:
        def write_files(tmp: Path) -> None:
            save_adapter(model, str(tmp / ADAPTER_FILE), training_summary=summary,
                         extra_tensors=_extra_tensors(extras))
            torch.save(state, tmp / STATE_FILE)

        path = write_checkpoint(root, step, write_files, meta)
        prune_checkpoints(root, keep_last)
    barrier(dist)
    return path


def _check_finite(named: dict[str, torch.Tensor]) -> None:
    bad = [n for n, p in named.items() if not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(f"refusing to save: non-finite values in {bad[:5]}{' ...' if len(bad) > 5 else ''}"
                                 "; lower the learning rate or use --amp bf16/none")


def _extra_tensors(extras: dict[str, nn.Parameter]) -> dict[str, torch.Tensor] | None:
    return {n: p.detach().cpu().contiguous() for n, p in extras.items()} or None


def _summary(cfg: TrainConfig, task: Task, amp: AmpRecipe, step: int, max_steps: int, loss: float | None,
             val_loss: float | None, best_val: float, world: int, nonfinite: int, stream: BatchStream) -> dict:
    """What goes into the adapter header: enough to tell how it was trained."""
    return {"task": task.name, "steps": step, "max_steps": max_steps, "train_loss": loss, "val_loss": val_loss,
            "best_val_loss": best_val if math.isfinite(best_val) else None, "learning_rate": cfg.learning_rate,
            "global_batch": cfg.batch_size * cfg.grad_accum * world, "world_size": world, "amp": amp.name,
            "seed": cfg.seed, "epochs_seen": stream.epoch + stream.offset / max(1, stream.batches_per_epoch),
            "nonfinite_skipped": nonfinite, "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha}


def _check_gradients(named: dict[str, nn.Parameter], world: int, main: bool) -> None:
    """After the first backward: trainables without a gradient belong to modules the task's loss does not use.
    One process trains on (they stay at their init) with a warning; under DDP that would fail at the next step with
    a reduction error naming none of them, so it stops here, before any update."""
    dead = [n for n, p in named.items() if p.grad is None]
    if not dead:
        return
    msg = (f"{len(dead)} trainable tensor(s) got no gradient in the first step, e.g. {dead[:3]}: the task's loss "
           "does not use their modules; drop those modules from lora_target_modules")
    if world > 1:
        raise RuntimeError(msg + " (under DDP every trainable must take part in every step)")
    _say(main, "warning: " + msg)


_NORMS = tuple(c for c in (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, getattr(nn, "RMSNorm", None),
                           nn.modules.batchnorm._NormBase) if c is not None)


def _cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Store every floating parameter that does not train, and every floating buffer, in `dtype`: the frozen base
    at half the memory, while the LoRA factors (and any extra trainable) keep their fp32. Normalisation layers stay
    fp32 (a few KB): their inputs may be fp32 (a model that mixes fp32 inputs into its residual stream), and a CPU
    layer_norm refuses fp32 inputs with half weights even under autocast; CUDA's autocast runs them in fp32 anyway."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _NORMS):
                continue
            for p in module._parameters.values():
                if p is not None and not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)
            for name, b in module._buffers.items():
                if b is not None and b.is_floating_point() and b.dtype != dtype:
                    module._buffers[name] = b.to(dtype)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _say(main: bool, msg: str) -> None:
    if main:
        print(f"[train] {msg}", file=sys.stderr, flush=True)


def _warn_config_drift(saved: dict[str, Any], current: dict[str, Any], main: bool) -> None:
    changed = sorted(k for k in set(saved) | set(current)
                     if k not in _RESUME_FREE_KEYS and saved.get(k) != current.get(k))
    if changed:
        _say(main, f"warning: resuming with changed settings {changed}; the run will not match an "
                   "uninterrupted one")


def _progress_bar(enabled: bool, step: int, total: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)
