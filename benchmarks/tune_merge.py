"""Sweep the fused merge kernels' tile configuration on the GPU (merge_triton.CONFIG) at IndexTTS2's GPT shape.

    python benchmarks/tune_merge.py --out results/tune_merge.json

For every configuration: merge / unmerge of the whole GPT (one adapter, and a 4-adapter blend), median of CUDA
event times, the host-side wall time of merge() (its Python and launch cost), a bit-exact restore check, and the
merged weights against the first row's (`merged_bits_vs_first`: 0 when W' does not depend on the tiles).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_merge import BLEND4, _cycle_times  # noqa: E402
from benchmarks.models import add_ours, build_base, gpt_config  # noqa: E402
from lora_engine import lora_layers, merge, unmerge  # noqa: E402
from lora_engine.kernels import merge_triton  # noqa: E402

# (merge tile, unmerge tile) per row: the two are timed separately, so one row tries one of each. The first row is the
# configured one; the others keep 4-8 elements per thread (the merge pass needs 64 registers in ptxas for sm_90,
# unmerge 32, where 32 elements per thread took 255). One-row tiles (BLOCK_M 1): P is one scalar per rank and Q
# shares the weight's layout, so the delta needs no shuffle through shared memory (NOTES (21)). A third entry caps the
# merge pass's registers (maxnreg: more warps per SM), a fourth gives it several tiles per program (TILES: the next
# tile's weights in flight while one is merged; 48 registers for 2 tiles).
def _tiles(m, u, maxnreg=None, tiles=1):
    return dict(BLOCK_M=m[0], BLOCK_N=m[1], num_warps=m[2], num_stages=1, maxnreg=maxnreg, TILES=tiles,
                U_BLOCK_M=u[0], U_BLOCK_N=u[1], U_num_warps=u[2])


PAIRS = [((1, 256, 2), (8, 128, 4), None, 2), ((1, 256, 2), (8, 128, 4)), ((1, 512, 4), (8, 128, 4), None, 2),
         ((1, 256, 2), (8, 128, 4), None, 3), ((1, 256, 2), (8, 128, 4), 40, 2), ((1, 512, 2), (8, 128, 4))]
CONFIGS = [_tiles(*p) for p in PAIRS]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the sweep as JSON here")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke test, e.g. with TRITON_INTERPRET=1)")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = add_ours(copy.deepcopy(build_base(gpt_config(args.tiny), dev, torch.bfloat16).eval()), list(BLEND4))
    original = {p: l.weight.detach().clone() for p, l in lora_layers(model).items()}
    first_merged = None  # the merged weights of the first configuration that ran
    rows = []
    for cfg in CONFIGS:
        merge_triton.CONFIG.update(cfg)
        try:
            merge(model, {"a0": 1.0})
            merged = {p: l.weight.detach().clone() for p, l in lora_layers(model).items()}
            unmerge(model)
            first_merged = first_merged or merged
            same = sum(int((merged[p].view(torch.int16) != first_merged[p].view(torch.int16)).sum()) for p in merged)
            del merged
            m1, u1 = _cycle_times(lambda: merge(model, {"a0": 1.0}), lambda: unmerge(model), args.iters, 3)
            m4, u4 = _cycle_times(lambda: merge(model, BLEND4), lambda: unmerge(model), args.iters, 3)
            walls = []
            for _ in range(10):
                torch.cuda.synchronize() if dev == "cuda" else None
                t0 = time.perf_counter()
                merge(model, {"a0": 1.0})
                walls.append((time.perf_counter() - t0) * 1e3)
                unmerge(model)
            changed = sum(int((l.weight.detach() != original[p]).sum()) for p, l in lora_layers(model).items())
            row = dict(cfg, merge_ms=m1["median_ms"], unmerge_ms=u1["median_ms"], blend4_merge_ms=m4["median_ms"],
                       blend4_unmerge_ms=u4["median_ms"], merge_wall_ms=sorted(walls)[5], bits_changed=changed,
                       merged_bits_vs_first=same)
        except Exception as e:  # a configuration that does not compile is a row, not the end of the sweep
            row = dict(cfg, error=repr(e)[:300])
            for layer in lora_layers(model).values():
                if layer.merged is not None:
                    unmerge(model)
                    break
        rows.append(row)
        print(json.dumps(row), flush=True)
    ok = [r for r in rows if "error" not in r and r["bits_changed"] == 0 and r["merged_bits_vs_first"] == 0]
    best = {}
    if ok:  # the merge tile and the unmerge tile are independent (delta does not depend on the tiles): each one's best
        m = min(ok, key=lambda r: r["merge_ms"] + r["blend4_merge_ms"])
        u = min(ok, key=lambda r: r["unmerge_ms"] + r["blend4_unmerge_ms"])
        best["merge_tile"] = {k: m[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "maxnreg", "TILES", "merge_ms",
                                                "blend4_merge_ms")}
        best["unmerge_tile"] = {k: u[k] for k in ("U_BLOCK_M", "U_BLOCK_N", "U_num_warps", "unmerge_ms",
                                                  "blend4_unmerge_ms")}
        print("best merge tile:", json.dumps(best["merge_tile"]))
        print("best unmerge tile:", json.dumps(best["unmerge_tile"]))
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "best": best}, indent=1))


if __name__ == "__main__":
    main()
