"""Where a training step's time goes: for the frozen floor, ours (r8) and PEFT (r8), the host time to issue one
step, the step's device time, the kernel count and kernel time, and the top ops by CPU and by CUDA time (ours
eager both with the fused Triton training kernels and on the PyTorch path).
Used to decide the next optimisation (see NOTES.md).
    python benchmarks/profile_train.py [--tables]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_train import _step_fn, _trainer, pytorch_path  # noqa: E402
from benchmarks.harness import apply_train_tiles, time_once  # noqa: E402
from benchmarks.models import add_ours, add_peft, build_base, gpt_config  # noqa: E402
from lora_engine import LoRALayer, compiled_op, lora_layers  # noqa: E402


def with_form(model, form: str):
    """The same LoRA, traced by torch.compile in another of compiled_op.FORMS (lora_engine/compiled_op.py)."""
    for layer in lora_layers(model).values():
        layer.compiled_form = form
    return model


def host_ms(step, n: int = 10) -> float:
    """Median host time to issue one step (the GPU drained before each, so the queue never blocks the host)."""
    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        out.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", action="store_true", help="print the profiler's top-op tables too")
    ap.add_argument("--compiled", action="store_true", help="profile the torch.compile'd steps instead")
    ap.add_argument("--train-tiles", default=None, help="a tune_train.py --out JSON: the fused kernels at its tiles")
    ap.add_argument("--no-tma", action="store_true", help="the fused GEMMs through pointer loads, not TMA")
    args = ap.parse_args()
    apply_train_tiles(args.train_tiles, tma=not args.no_tma)
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = gpt_config()
    base = build_base(cfg, "cuda", torch.float32)
    x = torch.randn(8, 512, cfg.n_embd, device="cuda")
    steps = {"frozen_floor": _step_fn(base, x, None, input_grad=True),
             "ours_r8": _trainer(add_ours(copy.deepcopy(base), ["a0"], 8), x),
             "ours_r8_pytorch": _trainer(pytorch_path(add_ours(copy.deepcopy(base), ["a0"], 8)), x),
             **{f"ours_r8_{form}": _trainer(with_form(add_ours(copy.deepcopy(base), ["a0"], 8), form), x)
                for form in compiled_op.FORMS if form != LoRALayer.compiled_form},
             "peft_r8": _trainer(add_peft(copy.deepcopy(base), ["a0"], 8), x)}
    for name, v in steps.items():
        if name != "frozen_floor":
            model, opt, step = v
            steps[name] = _step_fn(torch.compile(model), x, opt, input_grad=False) if args.compiled else step
        elif args.compiled:
            steps[name] = _step_fn(torch.compile(base), x, None, input_grad=True)
    for name, step in steps.items():
        if name.startswith("ours_r8_") and (name == "ours_r8_pytorch") == args.compiled:  # the forms differ only
            continue  # under torch.compile, the fused kernels only in eager
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        device = statistics.median(time_once(step) for _ in range(10))
        host = host_ms(step)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = sum(e.count for e in events if e.device_type.name == "CUDA")
        cuda_ms = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e3
        print(f"== {name}{' compiled' if args.compiled else ''}: step {device:.1f} ms, host issue {host:.1f} ms, {kernels} kernels, "
              f"{cuda_ms:.1f} ms of kernel time ==", flush=True)
        if args.tables:
            print(events.table(sort_by="self_cuda_time_total", row_limit=16, max_name_column_width=60))
            print(events.table(sort_by="self_cpu_time_total", row_limit=16, max_name_column_width=60))


if __name__ == "__main__":
    main()
