"""Where an eager training step's host (CPU/Python) time goes, on the GPU: cProfile of one step per variant.

    python benchmarks/host_train.py [--top 30] [--variants frozen_floor ours_r8 ...]

For the benchmark GPT (bench_train.py's step: B8 T512, bf16 autocast, fp32 base, r8 on four modules) and each of
the frozen floor, ours (fused Triton kernels), ours on the PyTorch path and PEFT: the host time to issue one step
with the GPU drained first (median of 10), the step's device time, then one step under cProfile, its functions by
own time and the calls into our layers by cumulative time. cProfile slows Python several-fold, so read its shares,
not its milliseconds. A step the host issues in less time than the GPU runs it is not host-bound.
First, per layer at the four GPT shapes (tune_train.Case, M = 4096): the host time of one layer's training step
(forward + backward, the GPU drained first) frozen, on our PyTorch path and fused, and of single calls (one fused
launch, one cuBLAS call, one torch.empty) to tell the launches' cost from the Python around them.
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import inspect
import io
import pstats
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_train import _step_fn, _trainer, pytorch_path  # noqa: E402
from benchmarks.harness import apply_train_tiles, time_once  # noqa: E402
from benchmarks.models import add_ours, add_peft, build_base, gpt_config  # noqa: E402
from benchmarks.profile_train import host_ms  # noqa: E402
from benchmarks.tune_train import SHAPES, Case  # noqa: E402
from lora_engine.kernels import lora_train_triton as lt  # noqa: E402
from lora_engine.kernels.launch import DirectLauncher, specialized  # noqa: E402

VARIANTS = ("frozen_floor", "ours_r8", "ours_r8_tensor_pointers", "ours_r8_pytorch", "peft_r8")


def tensor_pointers(step):
    """The step with the fused kernels' direct launches handed tensors, not addresses (launch.specialized)."""
    def run():
        DirectLauncher.raw_pointers = False
        try:
            step()
        finally:
            DirectLauncher.raw_pointers = True
    return run


def steps(names) -> dict:
    cfg = gpt_config()
    base = build_base(cfg, "cuda", torch.float32)
    x = torch.randn(8, 512, cfg.n_embd, device="cuda")
    make = {"frozen_floor": lambda: _step_fn(base, x, None, input_grad=True),
            "ours_r8": lambda: _trainer(add_ours(copy.deepcopy(base), ["a0"], 8), x)[2],
            "ours_r8_tensor_pointers": lambda: tensor_pointers(
                _trainer(add_ours(copy.deepcopy(base), ["a0"], 8), x)[2]),
            "ours_r8_pytorch": lambda: _trainer(pytorch_path(add_ours(copy.deepcopy(base), ["a0"], 8)), x)[2],
            "peft_r8": lambda: _trainer(add_peft(copy.deepcopy(base), ["a0"], 8), x)[2]}
    return {n: make[n]() for n in names}


def host_us(fn, n: int = 200) -> float:
    """Median host microseconds of one call with the GPU drained before each."""
    return host_ms(fn, n) * 1e3


def per_layer(dev: str = "cuda", rows: int = 4096) -> None:
    print("== per layer, host us (GPU drained before each call; median of 200) ==")
    print(f"{'layer':12} {'frozen':>8} {'pytorch':>8} {'fused':>8} | {'rows':>6} {'gemm':>6} {'grads':>6} "
          f"{'mm':>6} {'empty':>6}")
    for label, n_in, n_out, x_dtype in SHAPES:
        c = Case(label, n_in, n_out, x_dtype, rows, 8, dev)
        steps = [c.layer_step(c.frozen, False), c.layer_step(c.model, False), c.layer_step(c.model, True)]
        layer = [host_us(s) for s in steps]  # layer_step set fused_training; the last one leaves it on
        h, xr = lt._rows(c.x, c.Ac, n_in, 1, 8, (n_in, n_out))
        _, u = c.fused_dx()
        calls = [lambda: lt._rows(c.x, c.Ac, n_in, 1, 8, (n_in, n_out)),
                 lambda: lt._gemm(xr, c.W, 1, n_in, h, c.Bc, 1, 8, c.bias, c.s, n_out, c.W.dtype, (n_in, n_out),
                                  "fwd"),
                 lambda: c.fused_grads(u, h), lambda: torch.mm(c.dy, c.W),
                 lambda: torch.empty(rows, n_out, dtype=torch.bfloat16, device=dev)]
        one = [host_us(f) for f in calls]
        print(f"{label:12} " + " ".join(f"{v:8.1f}" for v in layer) + " | " + " ".join(f"{v:6.1f}" for v in one),
              flush=True)


def launch_costs(calls: int = 2000) -> None:
    """Host us per call, `calls` back to back (small shapes: the GPU keeps up), then one sync: one fused rows launch
    through DirectLauncher, the same CompiledKernel's run() called with its arguments ready, the launch that
    DirectLauncher keeps (launch._entry) called so, a torch.mm and a
    torch.empty of similar sizes; and the source of the installed triton's launcher __call__, to see what run()
    does on top of the C launch."""
    x = torch.randn(256, 1280, device="cuda", dtype=torch.bfloat16)
    Ac = torch.randn(8, 1280, device="cuda", dtype=torch.bfloat16)
    W = torch.randn(1280, 64, device="cuda", dtype=torch.bfloat16)
    lt._rows(x, Ac, 1280, 1, 8, (1280, 64))
    kw = lt._kw(1280, 64, 8, "rows")
    out = torch.empty(256, 8, dtype=torch.bfloat16, device="cuda")
    args = (x, Ac, out, x, 256, 1280, 8, 1280, 1, False)
    launcher = lt._LAUNCH["rows"]
    grid = (lt.cdiv(256, kw["BLOCK_M"]),)
    entry = next((v for v in launcher.compiled.values() if v is not None and v[0] is kw), None)
    kernel = launcher.jit_fn[grid](*args, **kw)  # the CompiledKernel the direct launches use

    def per_call(fn) -> float:
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / calls * 1e6

    rows = {"lt._rows (torch.empty + DirectLauncher)": lambda: lt._rows(x, Ac, 1280, 1, 8, (1280, 64)),
            "DirectLauncher call": lambda: launcher(grid, args, kw, (1280, 8, False)),
            "torch.mm [256,1280]x[1280,64]": lambda: torch.mm(x, W),
            "torch.empty [256, 8]": lambda: torch.empty(256, 8, dtype=torch.bfloat16, device="cuda")}
    if entry is not None:
        _, launch, head, constexprs = entry
        stream = torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())
        rows["CompiledKernel.run, tensors ready"] = lambda: kernel.run(
            grid[0], 1, 1, stream, kernel.function, kernel.packed_metadata, None, None, None, *args, *constexprs)
        raw = specialized(args, torch.cuda.current_device())[1]
        rows["CompiledKernel.run, addresses ready"] = lambda: kernel.run(
            grid[0], 1, 1, stream, kernel.function, kernel.packed_metadata, None, None, None, *raw, *constexprs)
        rows[f"the entry's launch ({getattr(launch, '__name__', type(launch).__name__)}), addresses ready"] = \
            lambda: launch(grid[0], 1, 1, stream, *head, *raw, *constexprs)
    rows["DirectLauncher call, tensors (raw_pointers off)"] = tensor_pointers(rows["DirectLauncher call"])
    print(f"== launch costs: host us per call, {calls} calls back to back ==")
    for name, fn in rows.items():
        print(f"{name:45s} {per_call(fn):7.2f}", flush=True)
    if entry is not None:
        run = kernel.run
        print(f"CompiledKernel.run is {type(run).__module__}.{type(run).__qualname__}; its __call__:")
        try:
            print(inspect.getsource(type(run).__call__))
        except (OSError, TypeError) as err:
            print(f"(no source: {err})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--top", type=int, default=30, help="functions listed per table")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--no-layers", action="store_true", help="skip the per-layer table")
    ap.add_argument("--train-tiles", default=None, help="a tune_train.py --out JSON: the fused kernels at its tiles")
    ap.add_argument("--no-tma", action="store_true", help="the fused GEMMs through pointer loads, not TMA")
    args = ap.parse_args()
    apply_train_tiles(args.train_tiles, tma=not args.no_tma)
    torch.backends.cuda.matmul.allow_tf32 = False
    if not args.no_layers:
        try:
            launch_costs()
        except Exception:  # a triton whose CompiledKernel differs: the tables below still come
            traceback.print_exc()
        per_layer()
    for name, step in steps(args.variants).items():
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        device = statistics.median(time_once(step) for _ in range(10))
        host = host_ms(step)
        prof = cProfile.Profile()
        torch.cuda.synchronize()
        prof.enable()
        step()
        prof.disable()
        torch.cuda.synchronize()
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        print(f"== {name}: step {device:.1f} ms on the GPU, host issue {host:.1f} ms "
              f"({'host' if host > device else 'GPU'}-bound); cProfile'd step {stats.total_tt * 1e3:.1f} ms ==")
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumulative").print_stats(r"lora_engine|peft/tuners", args.top)
        print("\n".join(line for line in out.getvalue().splitlines() if line.strip()), flush=True)
    print("fused launches so far, direct / through Triton's JIT:",
          {name: dict(launcher.launches) for name, launcher in lt._LAUNCH.items()})


if __name__ == "__main__":
    main()
