"""Time the fused decode kernel (lora_engine/kernels/lora_gemv_triton.py) against the PyTorch paths, sweep its tiles.

    python benchmarks/tune_gemv.py --out results/tune_gemv.json     # on the GPU: well under a minute
    TRITON_INTERPRET=1 python benchmarks/tune_gemv.py --tiny         # a CPU smoke test of this script only

The four LoRA layers of a GPT2-shaped decoder (1280 wide; transformers Conv1D, weight [in, out], bf16), one row of
fp32 x (LayerNorm output under autocast), rank R = 8 (one adapter) and R = 32 (four blended rank-8 adapters):
  cached        the existing no-grad path, functional.lora_linear_cached: cast x, base addmm, h = x Ac^T,
                y += h Bd^T (4 kernels)
  base          the base layer alone, torch.addmm(bias, x.to(bf16), W) (2 kernels): the floor
  fused         lora_gemv with the tiles decode uses (TUNED, else default_config), then each one of SWEEP
  layer_cached  the whole LoRAConv1D forward (the engine's Python included) on the cached path
  layer_fused   the same forward on the fused path (what decode runs now)
For each: eager us per call (CUDA events around one call, median of --iters after warm-up: the GPU time, or the
host time when the host is slower), graphed us per call (--graph-calls calls captured in one CUDA graph, median of
the replays), host us per call (perf_counter around --host-calls calls without a sync; `wall` includes the final
sync), and for the fused variants the max error against `cached` relative to its largest value (< 1e-2 passes).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import sync, time_once  # noqa: E402
from lora_engine import LoRASpec, inject_lora, lora_layers, set_blend  # noqa: E402
from lora_engine.functional import lora_linear_cached  # noqa: E402
from lora_engine.kernels import lora_gemv_triton as lg  # noqa: E402

SHAPES = [("attn.c_attn", 1280, 3840), ("attn.c_proj", 1280, 1280), ("mlp.c_fc", 1280, 5120),
          ("mlp.c_proj", 5120, 1280)]
LAYERS_PER_TOKEN = 24  # GPT2-sized: each of the four layers once per block
RANKS = [(8, 1), (32, 4)]  # (R, adapters of rank 8 blended)
CONFIG_KEYS = ("BLOCK_N", "BLOCK_K", "SPLIT", "num_warps", "num_stages")


def _configs(*rows: tuple) -> list[dict]:
    """Tile configurations from (BLOCK_N, BLOCK_K, SPLIT, num_warps, num_stages) rows."""
    return [dict(zip(CONFIG_KEYS, row)) for row in rows]


SWEEP = _configs((16, 256, 1, 4, 4), (16, 128, 2, 4, 4), (16, 256, 2, 4, 4), (32, 128, 1, 4, 4),
                 (32, 128, 2, 4, 4), (32, 64, 2, 4, 4), (64, 128, 2, 4, 4), (32, 256, 1, 8, 3),
                 (32, 64, 4, 4, 4))
# SPLIT 4 and 8 for the long-input layers (in >= 2 out: mlp.c_proj, 5120 -> 1280): 40 column blocks of 32 give a
# split of 2 only 80 programs for 132 SMs, each a 2560-long loop. 4 and 8 give 160-640 programs of 640-1280.
SWEEP_LONG = _configs((32, 128, 4, 4, 4), (32, 64, 4, 4, 4), (32, 256, 4, 4, 3), (32, 128, 4, 2, 4),
                      (16, 128, 4, 4, 4), (16, 256, 4, 4, 4), (16, 128, 4, 2, 4), (32, 128, 8, 4, 4),
                      (32, 64, 8, 4, 4), (16, 128, 8, 2, 4), (64, 128, 8, 4, 4))
MAX_REL_ERR = 1e-2


def eager_us(fn, iters: int) -> float:
    """Median us of one call: CUDA events on the GPU, a synced host clock on CPU (--tiny)."""
    return statistics.median(time_once(fn) for _ in range(iters)) * 1e3


def graph_us(fn, calls: int, replays: int) -> float | None:
    """Median us per call of `calls` calls captured in one CUDA graph (launch cost amortized); None off CUDA."""
    if not torch.cuda.is_available():
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture wants
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    sync()
    samples = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(samples)


def host_us(fn, calls: int) -> tuple[float, float]:
    """(host us per call with no sync in the loop, us per call including the final sync)."""
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    sync()
    t2 = time.perf_counter()
    return (t1 - t0) * 1e6 / calls, (t2 - t0) * 1e6 / calls


def make_layer(n_in: int, n_out: int, adapters: int, device: str):
    """A bf16 transformers Conv1D with `adapters` blended rank-8 LoRA adapters (non-zero B), as decode sees it."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = torch.nn.Module()
    model.c = Conv1D(n_out, n_in)
    torch.nn.init.normal_(model.c.weight, std=0.02)
    torch.nn.init.normal_(model.c.bias, std=0.02)
    model.to(device, torch.bfloat16).eval().requires_grad_(False)
    for i in range(adapters):
        inject_lora(model, LoRASpec(["c"], rank=8, alpha=16), f"a{i}")
    layer = lora_layers(model)["c"]
    with torch.no_grad():
        for A, B in zip(layer.lora_A.values(), layer.lora_B.values()):
            A.normal_(0, 1.0 / n_in ** 0.5)  # h = x A^T of order 1
            B.normal_(0, 0.02)  # the LoRA term a fraction of the base output, as after training
    set_blend(model, {f"a{i}": 1.0 - 0.3 * i for i in range(adapters)})
    return layer


def measure(name: str, fn, args, check=None) -> dict:
    row = {"variant": name}
    try:
        with torch.no_grad():
            for _ in range(3):  # compiles the kernel for this configuration
                out = fn()
            sync()
            if check is not None:
                err = ((out.float() - check.float()).abs().max() / check.float().abs().max()).item()
                row["max_rel_err"], row["ok"] = err, err < MAX_REL_ERR
            row["eager_us"] = eager_us(fn, args.iters)
            row["graph_us"] = graph_us(fn, args.graph_calls, args.replays)
            row["host_us"], row["wall_us"] = host_us(fn, args.host_calls)
    except Exception as e:  # a configuration that does not compile or launch is a row, not the end of the sweep
        row["error"] = repr(e)[:300]
    return row


class Case:
    """One layer shape at one rank: the layer, its cached factors, an fp32 input row, the cached path's output."""

    def __init__(self, label: str, n_in: int, n_out: int, rank: int, adapters: int, device: str):
        self.layer = make_layer(n_in, n_out, adapters, device)
        self.W, self.b = self.layer.weight, self.layer.bias
        self.Ac, self.Bd = self.layer.inference_factors(torch.bfloat16)
        assert self.Ac.shape[0] == rank, (self.Ac.shape, rank)
        self.x = torch.randn(1, 1, n_in, device=device)  # fp32, as LayerNorm hands it over under autocast
        with torch.no_grad():
            self.ref = lora_linear_cached(self.x, self.W, self.b, self.Ac, self.Bd, None, "in_out")
        self.result = {"layer": label, "in": n_in, "out": n_out, "rank": rank, "rows": []}
        self.pinned = lg.TUNED.get((n_in, n_out))  # the tiles decode runs with: pinned, else the default
        self.config = {**lg.default_config(n_in, n_out, rank), **(self.pinned or {})}

    def fused(self):
        return lg.lora_gemv(self.x, self.W, self.b, self.Ac, self.Bd, "in_out")


def core_rows(case: Case, args, device: str) -> None:
    """cached, base, fused with the tiles decode uses, and the whole layer on both paths."""
    x, W, b, Ac, Bd, res = case.x, case.W, case.b, case.Ac, case.Bd, case.result
    x2 = x.view(1, -1)
    res["rows"].append(measure("cached", lambda: lora_linear_cached(x, W, b, Ac, Bd, None, "in_out"), args))
    res["rows"].append(measure("base", lambda: torch.addmm(b, x2.to(torch.bfloat16), W), args))
    res["rows"].append(dict(measure("fused", case.fused, args, case.ref), config=case.config))
    applies = lg.applies
    with torch.autocast(device, dtype=torch.bfloat16):
        try:
            lg.applies = lambda *a: False  # layers._adapted falls back to lora_linear_cached
            res["rows"].append(measure("layer_cached", lambda: case.layer(x), args, case.ref))
        finally:
            lg.applies = applies
        res["rows"].append(measure("layer_fused", lambda: case.layer(x), args, case.ref))


def sweep_rows(case: Case, cfg: dict, args, over_budget: bool) -> None:
    res = case.result
    if cfg == case.config:
        return
    if over_budget:
        res["rows"].append({"variant": "fused", "config": cfg, "error": "skipped: time budget"})
        return
    lg.set_config(res["in"], res["out"], cfg)  # the production call path (cached launch parameters), these tiles
    try:
        res["rows"].append(dict(measure("fused", case.fused, args, case.ref), config=cfg))
    finally:
        lg.set_config(res["in"], res["out"], case.pinned)


def fmt(v, width=8, digits=1):
    return f"{v:{width}.{digits}f}" if isinstance(v, float) else f"{'-':>{width}}"


def cfg_str(cfg: dict | None) -> str:
    return ", ".join(str(cfg.get(k, 1)) for k in CONFIG_KEYS) if cfg else ""


def print_table(res: dict) -> None:
    print(f"\n{res['layer']}  [{res['in']} -> {res['out']}]  R={res['rank']}")
    print(f"  {'variant':13s} {'config (BN, BK, split, warps, st.)':32s} {'eager':>8s} {'graph':>8s} {'host':>8s} "
          f"{'wall':>8s} {'rel err':>9s}")
    for r in res["rows"]:
        cfg_s = cfg_str(r.get("config"))
        if "error" in r:
            print(f"  {r['variant']:13s} {cfg_s:32s} error: {r['error'][:80]}")
            continue
        err = f"{r['max_rel_err']:9.2e}" if "max_rel_err" in r else f"{'':9s}"
        flag = "" if r.get("ok", True) else "  FAIL"
        print(f"  {r['variant']:13s} {cfg_s:32s} {fmt(r['eager_us'])} {fmt(r['graph_us'])} {fmt(r['host_us'])} "
              f"{fmt(r['wall_us'])} {err}{flag}")


def summarize(results: list[dict]) -> dict:
    """Per-token totals of every path (best fused tiles per shape and rank); the tiles to pin per shape: those with
    the least graphed time (eager off CUDA) summed over the ranks they were measured at; and per shape that sum for
    the tiles decode uses now, for the least, and for the base layer alone."""
    per_token, tuned, now_cfg, base = {}, {}, {}, {}

    def cost(r):
        return r["graph_us"] if r["graph_us"] is not None else r["eager_us"]
    for rank in sorted({r["rank"] for r in results}):
        totals = {k: [0.0, 0.0] for k in ("cached", "base", "fused", "fused_best", "layer_cached",
                                           "layer_fused")}
        for res in (r for r in results if r["rank"] == rank):
            shape = (res["in"], res["out"])
            ok = [r for r in res["rows"] if "error" not in r]
            fused = [r for r in ok if r["variant"] == "fused" and r.get("ok")]
            by = {r["variant"]: r for r in ok if r["variant"] != "fused"}
            now = next((r for r in res["rows"] if r["variant"] == "fused"), None)  # the first: decode's tiles
            if now in fused:
                by["fused"] = now
                now_cfg[shape] = tuple(sorted(now["config"].items()))
            if fused:
                by["fused_best"] = min(fused, key=cost)
            if "base" in by:
                base[shape] = base.get(shape, 0.0) + cost(by["base"])
            for r in fused:
                cfg = tuple(sorted(r["config"].items()))
                tuned.setdefault(shape, {}).setdefault(cfg, []).append(cost(r))
            for name, t in totals.items():
                if name in by:
                    t[0] += LAYERS_PER_TOKEN * by[name]["eager_us"]
                    t[1] = None if by[name]["graph_us"] is None else t[1] + LAYERS_PER_TOKEN * by[name]["graph_us"]
        per_token[f"R{rank}"] = {k: {"eager_us": v[0], "graph_us": v[1]} for k, v in totals.items()}
    n_ranks = len(per_token)
    pinned, shapes = {}, {}
    for shape, cfgs in tuned.items():
        full = {cfg: sum(c) for cfg, c in cfgs.items() if len(c) == n_ranks}  # measured at every rank
        if not full:
            continue
        best = min(full, key=full.get)
        pinned[shape] = {k: dict(best)[k] for k in CONFIG_KEYS}
        shapes[shape] = {"now": dict(now_cfg[shape]) if now_cfg.get(shape) in full else None,
                         "now_us": full.get(now_cfg.get(shape)), "best": pinned[shape], "best_us": full[best],
                         "base_us": base.get(shape)}
    return {"per_token": per_token, "tuned": pinned, "shapes": shapes}


def tuned_source(tuned: dict) -> str:
    """`tuned` written as lora_gemv_triton.TUNED is, to paste over it."""
    entries = ",\n".join(f"    {shape}: {json.dumps({k: cfg[k] for k in CONFIG_KEYS})}" for shape, cfg in tuned.items())
    return "TUNED: dict[tuple[int, int], dict] = {\n" + entries + "}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write every row and the summary as JSON here")
    ap.add_argument("--iters", type=int, default=100, help="eager samples per variant (median)")
    ap.add_argument("--graph-calls", type=int, default=100, help="calls captured in one CUDA graph")
    ap.add_argument("--replays", type=int, default=20, help="graph replays per variant (median)")
    ap.add_argument("--host-calls", type=int, default=1000, help="calls for the host-side cost")
    ap.add_argument("--budget", type=float, default=90.0, help="seconds after which the sweep skips configurations "
                                                                 "(the default-tile rows always run first)")
    ap.add_argument("--tiny", action="store_true", help="small shapes, few iterations (a CPU smoke test with "
                                                        "TRITON_INTERPRET=1)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = SHAPES
    if args.tiny:
        shapes = [(n, i // 32 + 3, o // 32 + 5) for n, i, o in SHAPES]
        args.iters, args.graph_calls, args.replays, args.host_calls = 3, 4, 2, 3
        SWEEP[:], SWEEP_LONG[:] = SWEEP[:2], SWEEP_LONG[:1]
    if device == "cpu" and not lg._INTERPRET:
        sys.exit("tune_gemv.py needs a CUDA GPU (or TRITON_INTERPRET=1 with --tiny for a smoke test of the script)")
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "triton": getattr(lg.triton, "__version__", None), "layers_per_token": LAYERS_PER_TOKEN}
    print(json.dumps(info))
    t_start = time.perf_counter()
    cases = [Case(label, n_in, n_out, rank, adapters, device)
             for rank, adapters in RANKS for label, n_in, n_out in shapes]
    for case in cases:
        core_rows(case, args, device)
    long_input = [case for case in cases if case.result["in"] >= 2 * case.result["out"]]
    sweeps = [(cfg, long_input) for cfg in SWEEP_LONG] + [(cfg, cases) for cfg in SWEEP]
    for cfg, group in sweeps:  # configuration first: one compile (per padded rank) serves every shape
        for case in group:
            sweep_rows(case, cfg, args, time.perf_counter() - t_start > args.budget)
    results = [case.result for case in cases]
    for res in results:
        print_table(res)
    summary = summarize(results)
    fused_rows = [r for res in results for r in res["rows"] if "max_rel_err" in r]
    verdict = bool(fused_rows) and all(r["ok"] for r in fused_rows)
    print(f"\nper decoded token ({LAYERS_PER_TOKEN} x the four layers), us:")
    for rank, paths in summary["per_token"].items():
        print(f"  {rank}: " + ", ".join(f"{k} {v['eager_us']:.0f} eager / {v['graph_us']:.0f} graphed"
                                        if v["graph_us"] is not None else f"{k} {v['eager_us']:.0f} eager"
                                        for k, v in paths.items()))
    print(f"\nper shape, {'graphed' if device == 'cuda' else 'eager'} us summed over the ranks "
          f"(config: {', '.join(CONFIG_KEYS)}):")
    for (i, o), p in summary["shapes"].items():
        print(f"  [{i} -> {o}]  now ({cfg_str(p['now'])}) {fmt(p['now_us'], 6)}  least ({cfg_str(p['best'])}) "
              f"{fmt(p['best_us'], 6)}  base {fmt(p['base_us'], 6)}")
    print("tiles to pin per shape (the least above), to paste over lora_gemv_triton.TUNED:")
    print(tuned_source(summary["tuned"]))
    print(f"check: fused == cached within {MAX_REL_ERR:g} relative: {'PASS' if verdict else 'FAIL'} "
          f"({len(fused_rows)} outputs compared), {time.perf_counter() - t_start:.1f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tuned = {f"{i}x{o}": cfg for (i, o), cfg in summary["tuned"].items()}
        Path(args.out).write_text(json.dumps({"info": info, "results": results, "per_token": summary["per_token"],
                                              "tuned": tuned, "check_passed": verdict}, indent=1))


if __name__ == "__main__":
    main()
