"""Host (CPU/Python) time of merge() / unmerge() on the fused CUDA path, measured on a CPU with the kernels stubbed.

    python benchmarks/host_merge.py [--iters 50]

On the benchmark GPT (24 layers, 1280 wide, r8 on four modules: 96 layers in 4 same-shape groups) the fused path
(kernels/merge_triton.py) is forced for CPU tensors and its three kernels are replaced by no-ops, so what is timed
is the Python, allocation and bookkeeping of a call. The counts the host sync reads stay zero (no refusal, no short
overflow list). Besides the total, the parts the GPU waits for: host time before the first launch, and after the
one host sync of a merge (work between them runs while the kernels do). Not a GPU figure: a CPU host copy is
free where a CUDA one costs a transfer, a stubbed launch costs nothing where Triton's launcher costs ~30 us, and
the row that steps the adapter before each merge re-plans it, whose factor snapshot (a cat) is real CPU work here.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_merge import BLEND4  # noqa: E402
from benchmarks.models import add_ours, build_base, gpt_config  # noqa: E402
from lora_engine import lora_layers, merge, unmerge  # noqa: E402
from lora_engine.kernels import merge_triton  # noqa: E402

merge_module = importlib.import_module("lora_engine.merge")  # the module: `lora_engine.merge` is the function


class Marks:
    """When the call being timed first launched a kernel and last returned from the host sync (`finish`)."""

    first_launch: float | None = None
    last_sync: float | None = None


class _NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](*args)` only notes the time of the call's first launch."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if Marks.first_launch is None:
                Marks.first_launch = time.perf_counter()
        return launch


@contextlib.contextmanager
def stubbed_kernels():
    """The fused path taken for CPU tensors, its launches no-ops; everything restored on exit."""
    saved = {(merge_triton, "available"): merge_triton.available, (merge_triton, "finish"): merge_triton.finish,
             (merge_module, "_on_cuda_or_refuse"): merge_module._on_cuda_or_refuse}
    for name in ("_merge_kernel", "_unmerge_kernel", "_scatter_kernel"):
        saved[(merge_triton, name)] = getattr(merge_triton, name)
        setattr(merge_triton, name, _NoLaunch())
    real_finish = merge_triton.finish

    def finish(*args, **kwargs):
        out = real_finish(*args, **kwargs)
        Marks.last_sync = time.perf_counter()
        return out

    merge_triton.available = lambda weights, factors: bool(weights)
    merge_triton.finish = finish
    merge_module._on_cuda_or_refuse = lambda *args: None
    try:
        yield
    finally:
        for (owner, name), value in saved.items():
            setattr(owner, name, value)


def _timed(fn) -> tuple[float, float, float]:
    """ms of one call: in all, before its first launch, after its last host sync (0 without one)."""
    Marks.first_launch = Marks.last_sync = None
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    pre = (Marks.first_launch or t1) - t0
    post = t1 - Marks.last_sync if Marks.last_sync is not None else 0.0
    return (t1 - t0) * 1e3, pre * 1e3, post * 1e3


def _medians(do_merge, do_unmerge, iters: int, warmup: int = 5) -> dict[str, tuple[float, float, float]]:
    """Median (total, pre-launch, post-sync) ms of merge and of unmerge over `iters` merge/unmerge cycles."""
    for _ in range(warmup):
        do_merge()
        do_unmerge()
    rows = {"merge": [], "unmerge": []}
    for _ in range(iters):
        rows["merge"].append(_timed(do_merge))
        rows["unmerge"].append(_timed(do_unmerge))
    return {k: tuple(statistics.median(col) for col in zip(*v)) for k, v in rows.items()}


def _step(model, adapter: str) -> None:
    """An optimizer-style in-place update of one adapter (bumps every factor's version: a kept plan is stale)."""
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A[adapter].add_(0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = add_ours(copy.deepcopy(build_base(gpt_config(), "cpu", torch.bfloat16).eval()), list(BLEND4))
    with stubbed_kernels():
        merge(model, {"a0": 1.0})
        fused = all(isinstance(layer.merged, merge_module.FusedMergeRecord) for layer in lora_layers(model).values())
        unmerge(model)
        assert fused, "the fused path was not taken: the stubs no longer match merge.py / merge_triton.py"
        one = lambda: merge(model, {"a0": 1.0})  # noqa: E731
        rows = {
            "one adapter": _medians(one, lambda: unmerge(model), args.iters),
            "blend of four": _medians(lambda: merge(model, BLEND4), lambda: unmerge(model), args.iters),
            "one adapter, stepped before each merge": _medians(lambda: (_step(model, "a0"), one()),
                                                               lambda: unmerge(model), args.iters),
        }
    step_ms = statistics.median(_timed(lambda: _step(model, "a0"))[0] for _ in range(args.iters))
    print(f"host ms (CPU, kernels stubbed), median of {args.iters} cycles; 96 layers in 4 groups")
    heads = ("merge: all", "pre-launch", "post-sync", "unmerge: all", "pre-launch")
    print(f"  {'':<40} {heads[0]:>10} {heads[1]:>10} {heads[2]:>10}   {heads[3]:>12} {heads[4]:>10}")
    for name, r in rows.items():
        (m, m_pre, m_post), (u, u_pre, _) = r["merge"], r["unmerge"]
        if name.startswith("one adapter, stepped"):  # the step itself is not merge()'s time
            m, m_pre = m - step_ms, m_pre - step_ms
        print(f"  {name:<40} {m:10.3f} {m_pre:10.3f} {m_post:10.3f}   {u:12.3f} {u_pre:10.3f}")


if __name__ == "__main__":
    main()
