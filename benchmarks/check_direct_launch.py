"""Check the direct launch (lora_engine/kernels/launch.py) on the GPU: lora_gemv's, and the TMA training GEMMs'.

    python benchmarks/check_direct_launch.py     # on the GPU, well under 30 s; exits 1 on any mismatch

One decode row of fp32 x into a GPT2 c_attn shape (bf16 weight [1280, 3840] "in_out", bias, rank 8). The direct
launch must give bit-identical outputs to Triton's JIT launch: eagerly (M = 1, M = 2, a misaligned x: three
specializations) and replayed from a captured CUDA graph after x changed in place. Then host us per call,
perf_counter around 2000 calls without a sync (`wall` adds the final sync), JIT against direct. Then the same for
the fused training GEMMs, which take TMA descriptors (check_tma_gemm).
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


def check_tma_gemm() -> list[str]:
    """The fused training forward and backward (lora_train_triton) at c_attn's shape, M = 4096: its GEMMs take TMA
    descriptors (launch.Tiled), whose tensor maps a direct launch keeps. Direct == JIT bit for bit, eagerly and
    replayed from a CUDA graph after x changed in place; host us per forward + backward, JIT against direct."""
    from lora_engine.kernels import launch, lora_train_triton as lt
    failures = []
    g = torch.Generator(device="cuda").manual_seed(1)
    M, K, N, R = 4096, 1280, 3840, 8
    W = (torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).bfloat16()
    bias = torch.randn(N, device="cuda", generator=g).bfloat16()
    Ac = (torch.randn(R, K, device="cuda", generator=g) / K ** 0.5).bfloat16()
    Bc = (torch.randn(N, R, device="cuda", generator=g) / R ** 0.5).bfloat16()
    x = torch.randn(M, K, device="cuda", generator=g)
    dy = torch.randn(M, N, device="cuda", generator=g).bfloat16()
    launchers = [lt._LAUNCH[k] for k in ("gemm", "dx_da")] + [lt._LAUNCH[k] for k in ("rows", "u_db")]

    def step(xi, direct):
        for la in launchers:
            la.enabled = direct
        y, h, xr = lt.lora_forward(xi, W, bias, Ac, Bc, 2.0, "out_in")
        return (y, *lt.lora_backward(dy, xr, h, W, Ac, Bc, 2.0, "out_in", torch.float32))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jit = step(x, False)
        direct = [step(x, True) for _ in range(3)]
        same = all(torch.equal(a, b) for d in direct for a, b in zip(jit, d))
        print(f"TMA GEMMs, eager: direct == JIT bit for bit (y, dx, dA, dB): {same}")
        if not same:
            failures.append("TMA GEMMs: direct and JIT outputs differ")
        x_static = x.clone()
        step(x_static, True)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_graph = step(x_static, True)
        for i in range(2):
            x_static.copy_(torch.randn(x.shape, device="cuda", generator=g))
            graph.replay()
            torch.cuda.synchronize()
            same = all(torch.equal(a, b) for a, b in zip(out_graph, step(x_static, False)))
            print(f"TMA GEMMs, CUDA graph replay {i}: direct (captured) == JIT bit for bit: {same}")
            if not same:
                failures.append(f"TMA GEMMs, graph replay {i}: captured direct launch and JIT outputs differ")
    failures += [f"TMA GEMMs warning: {w.message}" for w in caught]
    for name in ("gemm", "dx_da"):
        entries = [e for e in lt._LAUNCH[name].compiled.values()]
        tiled = sum(bool(e and e[4]) for e in entries)
        maps = sum(len(m.maps) for e in entries if e for m in e[4].values() if isinstance(m, launch._TensorMaps))
        print(f"{name}: {len(entries)} entries, {tiled} with descriptors, {maps} tensor maps kept; launches "
              f"{lt._LAUNCH[name].launches}")
        if not tiled:
            failures.append(f"{name}: no direct-launch entry takes TMA descriptors")
    for direct in (False, True):
        step(x, direct)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            step(x, direct)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        print(f"host us per fused forward + backward ({'direct' if direct else 'JIT'}): {(t1 - t0) / 200 * 1e6:.1f} "
              f"(wall {(time.perf_counter() - t0) / 200 * 1e6:.1f})")
    for la in launchers:
        la.enabled = True
    return failures


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
    failures += check_tma_gemm()

    for f in failures:
        print("FAIL:", f)
    print("ok" if not failures else f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
