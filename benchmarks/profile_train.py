"""Where a training step's time goes: torch.profiler over one step of the frozen floor and of ours (r8),
the top kernels by CUDA time and the launch counts. Used to decide the next optimisation (see NOTES.md).
    python benchmarks/profile_train.py
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_train import _step_fn, _trainer  # noqa: E402
from benchmarks.models import add_ours, build_base, gpt_config  # noqa: E402


def main() -> None:
    cfg = gpt_config()
    base = build_base(cfg, "cuda", torch.float32)
    x = torch.randn(8, 512, cfg.n_embd, device="cuda")
    steps = {"frozen_floor": _step_fn(base, x, None, input_grad=True),
             "ours_r8": _trainer(add_ours(copy.deepcopy(base), ["a0"], 8), x)[2]}
    for name, step in steps.items():
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = sum(e.count for e in events if e.device_type.name == "CUDA")
        cuda_ms = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e3
        print(f"\n== {name}: {kernels} kernels, {cuda_ms:.1f} ms of kernel time ==")
        print(events.table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
