"""Check lora_gemv's direct launch (lora_engine/kernels/launch.py, as lora_gemv_triton.LAUNCHER) on the GPU.

    python benchmarks/check_direct_launch.py     # on the GPU, well under 30 s; exits 1 on any mismatch

One decode row of fp32 x into a GPT2 c_attn shape (bf16 weight [1280, 3840] "in_out", bias, rank 8). The direct
launch must give bit-identical outputs to Triton's JIT launch: eagerly (M = 1, M = 2, a misaligned x: three
specializations) and replayed from a captured CUDA graph after x changed in place. Then host us per call,
perf_counter around 2000 calls without a sync (`wall` adds the final sync), JIT against direct.
"""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora_engine.kernels import lora_gemv_triton as lg  # noqa: E402

CALLS = 2000


def run(x: torch.Tensor, factors: tuple, direct: bool) -> torch.Tensor:
    lg.LAUNCHER.enabled = direct
    return lg.lora_gemv(x, *factors, "in_out")


def host_us(x: torch.Tensor, factors: tuple, direct: bool) -> tuple[float, float]:
    """Host us per call (no sync inside the loop) and wall us per call (the final sync included)."""
    run(x, factors, direct)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(CALLS):
        run(x, factors, direct)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / CALLS * 1e6, (t2 - t0) / CALLS * 1e6


def main() -> int:
    print(f"torch {torch.__version__}, triton {lg.triton.__version__}, {torch.cuda.get_device_name()}")
    if not lg.LAUNCHER.direct:
        print("FAIL: this triton takes the JIT path only (direct launch is written for triton >= 3.6)")
        return 1
    g = torch.Generator(device="cuda").manual_seed(0)
    K, N, R = 1280, 3840, 8
    W = (torch.randn(K, N, device="cuda", generator=g) / K ** 0.5).bfloat16()
    bias = torch.randn(N, device="cuda", generator=g).bfloat16()
    Ac = (torch.randn(R, K, device="cuda", generator=g) / K ** 0.5).bfloat16()
    Bd = (torch.randn(N, R, device="cuda", generator=g) / R ** 0.5).bfloat16()
    factors = (W, bias, Ac, Bd)
    x = torch.randn(1, 1, K, device="cuda", generator=g)
    x2 = torch.randn(1, 2, K, device="cuda", generator=g)
    x_off = torch.randn(K + 1, device="cuda", generator=g)[1:].view(1, 1, K)  # 4 bytes past 16-byte alignment
    failures = []

    xr = x.bfloat16().float()  # the PyTorch math, so the comparisons below are not between two wrong answers
    want = xr @ W.float() + bias.float() + (xr @ Ac.float().t()).bfloat16().float() @ Bd.float().t()
    err = ((run(x, factors, False).float() - want).abs().max() / want.abs().max()).item()
    print(f"JIT against PyTorch: max error {err:.2e} of the largest value")
    if err > 1e-2:
        failures.append(f"JIT output is off the PyTorch math by {err:.2e}")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, xi in (("M=1", x), ("M=2", x2), ("misaligned x", x_off)):
            jit = [run(xi, factors, False) for _ in range(2)]
            direct = [run(xi, factors, True) for _ in range(3)]  # the first is a JIT launch that keeps the kernel
            same = all(torch.equal(jit[0], y) for y in jit[1:] + direct)
            print(f"eager {name}: direct == JIT bit for bit: {same}")
            if not same:
                failures.append(f"eager {name}: direct and JIT outputs differ")

        x_static = x.clone()
        run(x_static, factors, True)  # compiled and kept before capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_graph = run(x_static, factors, True)
        for step in range(3):
            x_static.copy_(torch.randn(x.shape, device="cuda", generator=g))  # the graph must read the new x
            graph.replay()
            torch.cuda.synchronize()
            same = torch.equal(y_graph, run(x_static, factors, False))
            print(f"CUDA graph replay {step}: direct (captured) == JIT bit for bit: {same}")
            if not same:
                failures.append(f"CUDA graph replay {step}: captured direct launch and JIT outputs differ")
    for w in caught:
        failures.append(f"warning: {w.message}")
    entries = list(lg.LAUNCHER.compiled.values())
    print(f"direct-launch entries: {len(entries)}, fallen back to JIT: {sum(e is None for e in entries)}; launched "
          f"through: {sorted({getattr(e[1], '__name__', type(e[1]).__name__) for e in entries if e is not None})}")
    if len(entries) < 3 or None in entries:
        failures.append("the direct path was not taken for every specialization")

    for name, xi in (("M=1", x), ("M=2", x2)):
        (jit_host, jit_wall), (direct_host, direct_wall) = host_us(xi, factors, False), host_us(xi, factors, True)
        print(f"host us per call, {name}: JIT {jit_host:.1f} (wall {jit_wall:.1f}), "
              f"direct {direct_host:.1f} (wall {direct_wall:.1f}): {jit_host / direct_host:.1f}x")
    lg.LAUNCHER.enabled = True

    for f in failures:
        print("FAIL:", f)
    print("ok" if not failures else f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
