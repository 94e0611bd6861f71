"""scripts/train.py under torchrun with 2 CPU processes (gloo): trains, matches one process with the same global
batch, writes files from rank 0 only, and resumes exactly."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch

from lora_engine.training import train
from lora_engine.training.checkpoint import list_checkpoints, load_state
from lora_engine.training.metrics import read_metrics

from .conftest import REPO, lora_tensors, small_config, subprocess_env

RUN = dict(max_steps=6, save_every=3, eval_every=3, batch_size=4, keep_last=5, lora_dropout=0.0)


def _torchrun(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cfg = small_config(out, **RUN)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "scripts" / "train.py"), "--output-dir", str(out), "--max-steps", str(cfg.max_steps),
           "--save-every", str(cfg.save_every), "--eval-every", str(cfg.eval_every), "--batch-size",
           str(cfg.batch_size), "--keep-last", str(cfg.keep_last), "--lora-rank", str(cfg.lora_rank),
           "--lora-dropout", "0", "--learning-rate", str(cfg.learning_rate), "--warmup-steps",
           str(cfg.warmup_steps), "--seed", str(cfg.seed), "--device", "cpu", "--amp", "none",
           "--no-tensorboard", "--no-plot", "--no-progress", *extra]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_process_gloo_matches_one_process_and_resumes(tmp_path: Path) -> None:
    ddp_dir = tmp_path / "ddp"
    _torchrun(ddp_dir)

    # one process, batch 4 x accumulation 2 == two processes x batch 4: same batches, same averaged gradient
    single = train(small_config(tmp_path / "single", **RUN, grad_accum=2))
    a, b = lora_tensors(tmp_path / "single" / "adapter.safetensors"), lora_tensors(ddp_dir / "adapter.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert any(v.abs().max() > 1e-3 for k, v in b.items() if "lora_B" in k)  # it trained
    ddp_lines = read_metrics(ddp_dir / "metrics.jsonl")
    single_lines = read_metrics(tmp_path / "single" / "metrics.jsonl")
    assert [r["step"] for r in ddp_lines] == [r["step"] for r in single_lines]  # rank 0 alone wrote: no doubles
    for r, s in zip(ddp_lines, single_lines):
        assert abs(r["loss"] - s["loss"]) < 1e-4 and abs(r.get("val_loss", 0) - s.get("val_loss", 0)) < 1e-4
    assert single.step == 6
    state = load_state(list_checkpoints(ddp_dir / "checkpoints")[-1])
    assert state["world_size"] == 2 and len(state["rng"]) == 2  # each rank's RNG is kept

    # resume under DDP: drop the last checkpoint and the final files, resume from step 3: same adapter again
    final = lora_tensors(ddp_dir / "adapter.safetensors")
    shutil.rmtree(ddp_dir / "checkpoints" / "step-00000006")
    (ddp_dir / "adapter.safetensors").unlink()
    proc = _torchrun(ddp_dir, "--resume")
    assert "resumed from" in proc.stderr and "at step 3/6" in proc.stderr
    again = lora_tensors(ddp_dir / "adapter.safetensors")
    for k in final:
        assert torch.equal(final[k], again[k]), k


def test_a_target_the_loss_never_uses_stops_ddp_before_any_update_naming_it(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "scripts" / "train.py"), "--task", "tests.lora_engine.training.spare_task:make_task",
           "--output-dir", str(tmp_path), "--max-steps", "3", "--device", "cpu", "--amp", "none",
           "--no-tensorboard", "--no-plot", "--no-progress"]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode != 0
    assert "got no gradient in the first step" in proc.stderr and "spare.lora_A.default" in proc.stderr
    assert not list_checkpoints(tmp_path / "checkpoints")  # stopped before any update or file
