"""train() end to end on the synthetic task: learning, artifacts, exact resume, NaN handling, early stopping."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lora_engine.training import NonFiniteLossError, TrainConfig, train
from lora_engine.training import synthetic
from lora_engine.training.checkpoint import list_checkpoints, load_state, read_meta
from lora_engine.training.metrics import read_metrics
from lora_engine.training.task import Task

from .conftest import lora_tensors, small_config


def test_loss_decreases_and_artifacts_are_sane(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, max_steps=40, batch_size=16, eval_every=10, save_every=10, keep_last=2,
                       plot=True, tensorboard=True)
    result = train(cfg)

    records = read_metrics(tmp_path / "metrics.jsonl")
    train_lines = [r for r in records if "val_loss" not in r]
    val_lines = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train_lines] == list(range(1, 41))
    assert all({"step", "loss", "lr", "grad_norm", "samples_per_s"} <= set(r) for r in train_lines)
    assert [r["step"] for r in val_lines] == [10, 20, 30, 40]
    first, last = train_lines[0]["loss"], sum(r["loss"] for r in train_lines[-5:]) / 5
    assert first > math.log(synthetic.VOCAB) * 0.9  # starts near chance
    assert last < first - 1.0, (first, last)         # and learns the rule
    assert val_lines[-1]["val_loss"] < val_lines[0]["val_loss"]
    # warmup then cosine: lr rises for 2 steps, then never rises again and ends near the floor
    lrs = [r["lr"] for r in train_lines]
    assert lrs[0] < lrs[1] < lrs[2] and all(b <= a + 1e-12 for a, b in zip(lrs[2:], lrs[3:]))
    assert lrs[-1] == pytest.approx(cfg.learning_rate * cfg.min_lr_ratio, rel=0.05)

    assert result.step == 40 and result.stop_reason == "max_steps"
    assert result.best_val_loss == pytest.approx(min(r["val_loss"] for r in val_lines))
    # keep_last=2 plus the best (the last here, since val_loss falls): steps 30 and 40
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in ckpts] == ["step-00000030", "step-00000040"]
    for p in ckpts:
        state = load_state(p)
        assert state["step"] == int(p.name.split("-")[1])
        assert {"optimizer", "scheduler", "scaler", "rng", "data", "config", "trainables"} <= set(state)
        assert read_meta(p)["val_loss"] == pytest.approx(
            next(r["val_loss"] for r in val_lines if r["step"] == state["step"]))
        for name, t in lora_tensors(p).items():
            assert torch.isfinite(t).all(), name
    final = lora_tensors(tmp_path / "adapter.safetensors")
    assert final and all(torch.equal(final[k], v) for k, v in lora_tensors(ckpts[-1]).items())
    assert any(v.abs().sum() > 0 for k, v in final.items() if "lora_B" in k)  # B moved off its zero init
    png = (tmp_path / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path, grad_accum: int) -> None:
    """2N steps straight == N steps, stop, resume for N more: bit-identical adapters (dropout on, so RNG counts)."""
    n = 6
    kw = dict(max_steps=2 * n, save_every=n, eval_every=4, grad_accum=grad_accum, lora_dropout=0.1,
              batch_size=4, bucket_window=3)
    straight = train(small_config(tmp_path / "straight", **kw))

    first = small_config(tmp_path / "split", **{**kw, "max_steps": 2 * n})
    # stop after N steps: a run whose max_steps is N but whose schedule is that of 2N would differ, so instead
    # train the first half through a task that raises after N steps, the way a crash would.
    class Stop(Exception):
        pass

    calls = {"n": 0}
    base = synthetic.make_task(first)

    def loss_then_crash(model, batch):
        if model.training:  # validation batches do not count
            if calls["n"] == n * grad_accum:
                raise Stop
            calls["n"] += 1
        return base.loss_fn(model, batch)

    crashing = Task(base.name, base.build_model, base.load_data, loss_then_crash, base.default_target_modules)
    with pytest.raises(Stop):
        train(first, crashing)
    assert [p.name for p in list_checkpoints(tmp_path / "split" / "checkpoints")][-1] == f"step-{n:08d}"

    resumed = train(small_config(tmp_path / "split", **{**kw, "resume": True}))
    a, b = lora_tensors(tmp_path / "straight" / "adapter.safetensors"), lora_tensors(
        tmp_path / "split" / "adapter.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.step == straight.step == 2 * n and resumed.loss == straight.loss
    assert resumed.val_loss == straight.val_loss
    # the metrics of the resumed run read like one run: each step once
    steps = [r["step"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl") if "val_loss" not in r]
    assert steps == list(range(1, 2 * n + 1))


def test_fresh_run_refuses_a_dir_with_checkpoints(tmp_path: Path) -> None:
    train(small_config(tmp_path, max_steps=2, save_every=0, eval_every=0))
    with pytest.raises(FileExistsError, match="--resume"):
        train(small_config(tmp_path, max_steps=2))


def _nan_task(bad_steps: set[int]) -> Task:
    """The synthetic task whose loss is NaN at the given (1-based) optimizer steps."""
    base = synthetic.make_task()
    count = {"n": 0}

    def loss_fn(model, batch):
        count["n"] += model.training
        loss = base.loss_fn(model, batch)
        return loss * float("nan") if count["n"] in bad_steps else loss

    return Task(base.name, base.build_model, base.load_data, loss_fn, base.default_target_modules)


def test_nonfinite_loss_is_skipped_and_counted(tmp_path: Path) -> None:
    result = train(small_config(tmp_path, max_steps=8, save_every=2, eval_every=0), _nan_task({3, 6, 7}))
    assert result.nonfinite_skipped == 3 and result.step == 8 and math.isfinite(result.loss)
    records = read_metrics(tmp_path / "metrics.jsonl")
    skipped = [r["step"] for r in records if r.get("skipped")]
    assert skipped == [3, 6, 7]
    assert all(r["loss"] == "nan" for r in records if r.get("skipped"))
    for p in list_checkpoints(tmp_path / "checkpoints"):
        assert all(torch.isfinite(t).all() for t in lora_tensors(p).values())
    assert all(torch.isfinite(t).all() for t in lora_tensors(tmp_path / "adapter.safetensors").values())


def test_nonfinite_loss_in_a_row_stops_without_saving_nan(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        train(small_config(tmp_path, max_steps=20, save_every=2, eval_every=0), _nan_task(set(range(5, 100))))
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    # NaN from step 5 on, stop at step 7; skipped steps leave the weights as they were, so saving is still safe
    assert [p.name for p in ckpts] == ["step-00000004", "step-00000006"]
    assert all(torch.isfinite(t).all() for p in ckpts for t in lora_tensors(p).values())
    assert not (tmp_path / "adapter.safetensors").exists()


def test_early_stopping_keeps_the_best(tmp_path: Path) -> None:
    # min_delta so large that only the first evaluation counts as an improvement: patience 2 stops at the third
    result = train(small_config(tmp_path, max_steps=60, learning_rate=1.0, warmup_steps=0, eval_every=2,
                                save_every=0, max_grad_norm=0.0, early_stopping_patience=2,
                                early_stopping_min_delta=1e9))
    assert result.stop_reason == "early_stopping" and result.step == 6
    vals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "val_loss" in r]
    assert len(vals) == 3
    best = (tmp_path / "adapter_best.safetensors")
    assert best.exists()
    best_ckpt = tmp_path / "checkpoints" / "step-00000002"
    assert read_meta(best_ckpt)["val_loss"] == pytest.approx(vals[0]["val_loss"])
    assert all(torch.equal(v, lora_tensors(best)[k]) for k, v in lora_tensors(best_ckpt).items())


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(tmp_path: Path, amp: str) -> None:
    result = train(small_config(tmp_path, max_steps=4, amp=amp, save_every=0, eval_every=0))
    assert result.step == 4 and math.isfinite(result.loss)
    state = load_state(result.last_checkpoint)
    assert state["scaler"].get("scale") is not None if amp == "fp16" else state["scaler"] == {}
    lines = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "val_loss" not in r]
    assert len(lines) == 4 and all(("loss_scale" in r) == (amp == "fp16") for r in lines)


def test_several_manifests_with_weights(tmp_path: Path) -> None:
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    seqs = synthetic.make_sequences(40, seed=3)
    a.write_text("".join(json.dumps({"tokens": s}) + "\n" for s in seqs[:30]))
    b.write_text("".join(json.dumps({"tokens": s}) + "\n" for s in seqs[30:]))
    cfg = small_config(tmp_path / "out", train_manifests=[str(a), {"path": str(b), "weight": 3.0}],
                       val_manifests=[str(b)], max_steps=None, epochs=2, batch_size=5, eval_every=0)
    assert cfg.train_weights == [1.0, 3.0]
    result = train(cfg)
    assert result.step == 16  # 40 weighted examples an epoch = 8 batches of 5, two epochs
    assert result.val_loss is not None and math.isfinite(result.val_loss)


def test_a_bf16_base_trains_like_an_fp32_one_and_its_adapter_fits_the_fp32_base(tmp_path: Path) -> None:
    from lora_engine import load_adapter

    base = synthetic.make_task()
    seen: dict[str, torch.dtype] = {}

    def loss_fn(model, batch):
        seen.update({n: p.dtype for n, p in model.named_parameters()} if not seen else {})
        return base.loss_fn(model, batch)

    task = Task(base.name, base.build_model, base.load_data, loss_fn, base.default_target_modules)
    kw = dict(max_steps=40, batch_size=16, amp="bf16", save_every=0, eval_every=0)
    half = train(small_config(tmp_path / "bf16", base_dtype="bf16", **kw), task)
    assert {d for n, d in seen.items() if ".lora_" in n} == {torch.float32}  # factors and AdamW state stay fp32
    assert {d for n, d in seen.items() if ".ln_" in n} == {torch.float32}  # norms too (their inputs may be fp32)
    frozen = {d for n, d in seen.items() if ".lora_" not in n and ".ln_" not in n}
    assert frozen == {torch.bfloat16}
    seen.clear()
    full = train(small_config(tmp_path / "fp32", **kw), task)
    assert {d for n, d in seen.items() if ".lora_" not in n} == {torch.float32}
    assert half.loss < 0.8 * math.log(synthetic.VOCAB) and abs(half.loss - full.loss) < 0.05 * full.loss

    torch.manual_seed(7)  # the fp32 base the run started from: the adapter's fingerprint (bf16 rounding) matches
    load_adapter(synthetic.build_model(), tmp_path / "bf16" / "adapter.safetensors")


def test_a_half_base_without_matching_autocast_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs --amp bf16"):
        train(small_config(tmp_path, base_dtype="bf16", amp="none", max_steps=2))
    assert not (tmp_path / "checkpoints").exists()


def test_one_process_warns_about_a_target_the_loss_never_uses(tmp_path: Path, capsys) -> None:
    from .spare_task import make_task

    result = train(small_config(tmp_path, max_steps=2, save_every=0, eval_every=0), make_task())
    assert result.step == 2
    err = capsys.readouterr().err
    assert "warning: 2 trainable tensor(s) got no gradient" in err and "spare.lora_B.default" in err
