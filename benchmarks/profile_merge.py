"""Where merge / unmerge time goes on the full GPT shape: host wall time vs kernel time, per kernel.
    python benchmarks/profile_merge.py     # one adapter, the configured tiles (merge_triton.CONFIG)
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.models import add_ours, build_base, gpt_config  # noqa: E402
from lora_engine import merge, unmerge  # noqa: E402
from lora_engine.kernels import merge_triton  # noqa: E402


def profile_merge(model: torch.nn.Module) -> None:
    """Warm up (compiles, builds the kept plan), then profile one merge and one unmerge."""
    for _ in range(3):
        merge(model, {"a0": 1.0})
        unmerge(model)
    tiles = {k: v for k, v in merge_triton.CONFIG.items() if "BLOCK" in k or "warps" in k}
    for name, fn in (("merge", lambda: merge(model, {"a0": 1.0})), ("unmerge", lambda: unmerge(model))):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
        ev = prof.key_averages()
        kern = sum(e.self_device_time_total for e in ev if e.device_type.name == "CUDA") / 1e3
        print(f"\n== {name} (tiles {tiles}): wall {wall:.2f} ms (profiled), kernel time {kern:.2f} ms ==")
        print(ev.table(sort_by="self_cuda_time_total", row_limit=8, max_name_column_width=50))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args()
    profile_merge(add_ours(copy.deepcopy(build_base(gpt_config(), "cuda", torch.bfloat16)), ["a0"]))


if __name__ == "__main__":
    main()
