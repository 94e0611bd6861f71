"""Which kernels pay a setup cost the first time they see a sequence length (NOTES.md (25)).

Training steps on the full-size UnifiedVoice took ~0.1 s longer whenever the batch's sequence length was new. This
times, per candidate, the first call at each of several new lengths against a second call at the same length:
causal attention forward + backward under each SDPA backend (and the default choice), and a bf16 GEMM forward +
backward at UnifiedVoice's widths. Prints one JSON object; `--out FILE` also writes it.

    python benchmarks/shape_setup.py --out benchmarks/results/h200-2026-11-29-shape_setup.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

B, HEADS, HEAD_DIM, WIDTH = 4, 20, 64, 1280  # UnifiedVoice's GPT: 1280 wide, 20 heads; batch 4


def attention_step(T: int, backends: list[SDPBackend] | None) -> None:
    q, k, v = (torch.randn(B, HEADS, T, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    if backends is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        with sdpa_kernel(backends):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.backward(torch.ones_like(out))


def gemm_step(T: int, weight: torch.Tensor) -> None:
    x = torch.randn(B * T, WIDTH, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = x @ weight
    y.backward(torch.ones_like(y))


def timed(fn, T: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(T)
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0)


def first_vs_repeat(fn, lengths: list[int]) -> dict:
    fn(512)  # library loading and the allocator's first blocks, outside the measurement
    fn(512)
    first, again = [], []
    for T in lengths:
        first.append(timed(fn, T))
        again.append(timed(fn, T))
    return {"first_ms_median": statistics.median(first), "repeat_ms_median": statistics.median(again),
            "first_ms": [round(t, 3) for t in first], "repeat_ms": [round(t, 3) for t in again]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    lengths = list(range(601, 621))  # 20 lengths none of the candidates has seen
    candidates = {
        "sdpa_default": lambda T: attention_step(T, None),
        "sdpa_flash": lambda T: attention_step(T, [SDPBackend.FLASH_ATTENTION]),
        "sdpa_efficient": lambda T: attention_step(T, [SDPBackend.EFFICIENT_ATTENTION]),
        "sdpa_cudnn": lambda T: attention_step(T, [SDPBackend.CUDNN_ATTENTION]),
        "sdpa_math": lambda T: attention_step(T, [SDPBackend.MATH]),
    }
    weight = torch.randn(WIDTH, 3 * WIDTH, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    candidates["gemm_c_attn"] = lambda T: gemm_step(T, weight)
    res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "cudnn": torch.backends.cudnn.version(), "shape": {"batch": B, "heads": HEADS, "head_dim": HEAD_DIM},
           "lengths": [lengths[0], lengths[-1]]}
    for i, (name, fn) in enumerate(candidates.items()):
        span = [T + 100 * i for T in lengths]  # each candidate its own unseen lengths
        try:
            res[name] = first_vs_repeat(fn, span)
        except RuntimeError as e:  # a backend this build or GPU lacks
            res[name] = {"error": str(e).splitlines()[0]}
        print(name, {k: v for k, v in res[name].items() if not isinstance(v, list)}, flush=True)
    text = json.dumps(res, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
