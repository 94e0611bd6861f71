"""Time the fused LoRA training kernels (lora_engine/kernels/lora_train_triton.py) against cuBLAS, sweep their tiles.

    python benchmarks/tune_train.py --out results/tune_train.json    # on the GPU: about two minutes
    TRITON_INTERPRET=1 python benchmarks/tune_train.py --tiny        # a CPU smoke test of this script only

The four LoRA layers of IndexTTS2's GPT (1280 wide; the kept cast base [out, in] bf16), M = 4096 rows (B8 T512),
rank 8, x in fp32 where LayerNorm hands it over (c_attn, mlp.c_fc) and bf16 elsewhere, as under bf16 autocast:
  cublas_fwd / cublas_dx   the base GEMM alone, addmm(bias, xr, W^T) / dy W: what the frozen floor's GEMMs cost
  pytorch_fwd              functional._KeptLoRAFn's forward (cast x, [base | h] = x [W; Ac]^T, y += s h Bc^T)
  pytorch_bwd              its backward (u = dy Bc, dx = dy W + s u Ac, cast dx, dA, dB)
  fused_fwd / fused_dx / fused_grads   the kernels, at the tiles in use (fwd and dx include their rows pass:
                           h over x, u over dy), then each row of the sweeps
  fused_rows               the two rows passes alone
  layer_frozen / layer_pytorch / layer_fused   a whole LoRAConv1D training step (forward + backward, the engine's
                           Python included) against the frozen Conv1D's: per-layer host and GPU time together
Kernel rows: CUDA events around --reps back-to-back calls, the median of --samples such timings, per call (the GPU
time: the host runs ahead). Layer rows: events around one step, median of --samples x --reps steps (the host's time
where it is slower). Every fused output is checked against float64 (relative norm < 1e-2).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import sync  # noqa: E402
from lora_engine import LoRASpec, inject_lora, lora_layers, train_casts  # noqa: E402
from lora_engine import functional as Fn  # noqa: E402
from lora_engine.kernels import lora_train_triton as lt  # noqa: E402

SHAPES = [("attn.c_attn", 1280, 3840, torch.float32), ("attn.c_proj", 1280, 1280, torch.bfloat16),
          ("mlp.c_fc", 1280, 5120, torch.float32), ("mlp.c_proj", 5120, 1280, torch.bfloat16)]
GEMM_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
GRADS_KEYS = ("BLOCK_F", "BLOCK_M", "num_warps", "num_stages")
ROWS_KEYS = ("BLOCK_M", "BLOCK_K", "num_warps", "num_stages")
# BLOCK_N output columns, BLOCK_K the reduction step (for dx too)
# (TMA: 128x256x64 at 4 stages needs more shared memory than an H100 has; it runs through pointers then)
GEMM_SWEEP = [dict(zip(GEMM_KEYS, row)) for row in (
    (128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (128, 128, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3),
    (128, 128, 64, 8, 4, 4), (64, 256, 64, 8, 4, 3), (64, 128, 64, 8, 4, 4), (128, 64, 64, 8, 4, 4),
    (128, 256, 32, 8, 8, 4), (256, 128, 32, 8, 8, 4), (128, 128, 64, 8, 4, 3), (64, 128, 128, 8, 4, 3),
    (128, 256, 64, 8, 8, 4))]
ROWS_SWEEP = [dict(zip(ROWS_KEYS, row)) for row in (
    (32, 128, 4, 3), (64, 128, 4, 3), (16, 256, 4, 3), (32, 256, 4, 3), (64, 64, 4, 4), (32, 64, 2, 4), (16, 128, 4, 4),
    (16, 64, 2, 4), (128, 64, 4, 3))]
GRADS_SWEEP = [dict(zip(GRADS_KEYS, row)) for row in (
    (32, 128, 4, 3), (64, 128, 4, 3), (32, 256, 4, 3), (16, 256, 4, 3), (64, 128, 4, 5), (32, 64, 2, 4))]
MAX_REL_ERR = 1e-2


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def _time(fn, reps: int, samples: int) -> float:
    """us per call: CUDA events around `reps` calls (a synced host clock on CPU), median of `samples`."""
    fn()
    sync()
    out = []
    for _ in range(samples):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) * 1e3 / reps)
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            out.append((time.perf_counter() - t0) * 1e6 / reps)
    return statistics.median(out)


class Case:
    """One layer shape: operands, float64 references, the PyTorch path's kept views, a whole-layer model."""

    def __init__(self, label: str, n_in: int, n_out: int, x_dtype: torch.dtype, rows: int, rank: int, dev: str):
        from transformers.pytorch_utils import Conv1D
        self.label, self.n_in, self.n_out, self.rank, self.s = label, n_in, n_out, rank, 2.0
        torch.manual_seed(n_in + n_out)
        conv = Conv1D(n_out, n_in).to(dev)
        torch.nn.init.normal_(conv.weight, std=0.02)
        torch.nn.init.normal_(conv.bias, std=0.02)
        self.frozen = torch.nn.Sequential(conv).requires_grad_(False)
        self.model = copy.deepcopy(self.frozen)
        inject_lora(self.model, LoRASpec(["0"], rank=rank, alpha=2 * rank), "a")
        self.layer = lora_layers(self.model)["0"]
        with torch.no_grad():
            self.layer.lora_B["a"].normal_(0, 0.02)
        A, B = self.layer.lora_A["a"], self.layer.lora_B["a"]
        c = train_casts.cast_factors(self.layer, A, B, torch.bfloat16, self.layer.weight, self.layer.bias, "in_out")
        self.kept = c.kept
        _, self.bias, self.W, self.Ac, self.Bc, _ = c.kept
        self.x = torch.randn(rows, n_in, device=dev, dtype=x_dtype)
        self.xr = self.x.to(torch.bfloat16)
        self.dy = torch.randn(rows, n_out, device=dev, dtype=torch.bfloat16)
        self.A, self.B = A, B
        W64, Ac64, Bc64, x64, dy64 = (t.double() for t in (self.W, self.Ac, self.Bc, self.xr, self.dy))
        h64, u64 = x64 @ Ac64.t(), dy64 @ Bc64
        self.ref = {"y": x64 @ W64.t() + self.bias[:n_out].double() + self.s * h64 @ Bc64.t(), "h": h64,
                    "dx": dy64 @ W64 + self.s * u64 @ Ac64, "u": u64, "dA": self.s * u64.t() @ x64,
                    "dB": self.s * dy64.t() @ h64}

    def fused_fwd(self):
        return lt.lora_forward(self.x, self.W, self.bias, self.Ac, self.Bc, self.s, "out_in")

    def fused_rows(self):
        """The two rows passes a step makes (h over x, u over dy), as the layer runs them."""
        return (lt._rows(self.x, self.Ac, self.n_in, 1, self.rank, (self.n_in, self.n_out)),
                lt._rows(self.dy, self.Bc, 1, self.rank, self.rank, (self.n_in, self.n_out)))

    def fused_dx(self):
        return lt.lora_dx(self.dy, self.W, self.Ac, self.Bc, self.s, "out_in", self.x.dtype)

    def fused_grads(self, u, h):
        return lt.lora_factor_grads(self.xr, u, self.dy, h, self.s)

    def check(self) -> float:
        """The worst relative error of any fused output against float64 (fresh outputs at the current tiles)."""
        y, h, xr = self.fused_fwd()
        dx, u = self.fused_dx()
        dA, dB = self.fused_grads(u, h)
        assert torch.equal(xr, self.xr), "xr is not x rounded to bf16"
        got = {"y": y, "h": h, "dx": dx, "u": u, "dA": dA, "dB": dB}
        return max(_rel(got[k], self.ref[k]) for k in got)

    def pytorch_bwd(self, h):
        dy, s = self.dy, self.s
        u = torch.mm(dy, self.Bc)
        dx = torch.mm(dy, self.W).addmm_(u, self.Ac, alpha=s).to(self.x.dtype)
        return dx, Fn._mm(u.t(), self.xr, s, torch.float32), Fn._mm(dy.t(), h, s, torch.float32)

    def layer_step(self, model, fused: bool):
        self.layer.fused_training = fused
        x = self.x.view(8, -1, self.n_in) if self.x.shape[0] % 8 == 0 else self.x[None]
        g = self.dy.view(*x.shape[:-1], self.n_out)

        def step():
            xg = x.detach().requires_grad_(True)
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                y = model(xg)
            y.backward(g)
        return step


def core_rows(case: Case, args) -> dict:
    r, t = {}, lambda fn: _time(fn, args.reps, args.samples)
    W_t = case.W.t()
    r["cublas_fwd"] = t(lambda: torch.addmm(case.bias[:case.n_out], case.xr, W_t))
    r["cublas_dx"] = t(lambda: torch.mm(case.dy, case.W))
    with torch.no_grad():
        r["pytorch_fwd"] = t(lambda: Fn._KeptLoRAFn.apply(case.x, case.A, case.B, case.kept, case.s))
    h = case.fused_fwd()[1]
    r["pytorch_bwd"] = t(lambda: case.pytorch_bwd(h))
    u = case.fused_dx()[1]
    r["fused_fwd"], r["fused_dx"], r["fused_rows"] = t(case.fused_fwd), t(case.fused_dx), t(case.fused_rows)
    r["fused_grads"] = t(lambda: case.fused_grads(u, h))
    r["max_rel_err"] = case.check()
    for name, model, fused in (("layer_frozen", case.frozen, False), ("layer_pytorch", case.model, False),
                               ("layer_fused", case.model, True)):
        r[name] = t(case.layer_step(model, fused))
    case.layer.fused_training = True
    return r


def sweep(cases: list[Case], which: str, configs: list[dict], args, deadline: float) -> dict:
    """us per call of pass `which` at each configuration, per shape, with its error; the default's row first."""
    rows = []
    for cfg in configs:
        if time.perf_counter() > deadline:
            break
        row = {"config": cfg, "us": {}, "max_rel_err": {}}
        for case in cases:
            lt.set_config(case.n_in, case.n_out, which, cfg)
            try:
                h, u = case.fused_fwd()[1], case.fused_dx()[1]
                fn = {"rows": case.fused_rows, "fwd": case.fused_fwd, "dx": case.fused_dx,
                      "grads": lambda: case.fused_grads(u, h)}[which]
                row["us"][case.label] = _time(fn, args.reps, args.samples)
                row["max_rel_err"][case.label] = case.check()
            except Exception as err:  # a tile Triton cannot compile (shared memory): that row only
                row["us"][case.label], row["max_rel_err"][case.label] = None, repr(err)[:200]
            lt.set_config(case.n_in, case.n_out, which, None)
        rows.append(row)
        print(f"  {which} {cfg}: " + ", ".join(f"{k} {v:.1f}" if v else f"{k} failed" for k, v in row["us"].items()),
              flush=True)
    return rows


def best_tiles(cases: list[Case], sweeps: dict) -> dict:
    """Per shape and pass, the fastest configuration whose outputs passed the float64 check."""
    tuned = {}
    for case in cases:
        per = tuned.setdefault(f"{case.n_in}x{case.n_out}", {})
        for which, rows in sweeps.items():
            ok = [(r["us"][case.label], r["config"]) for r in rows if r["us"].get(case.label)
                  and isinstance(r["max_rel_err"][case.label], float) and r["max_rel_err"][case.label] < MAX_REL_ERR]
            if ok:
                per[which] = min(ok, key=lambda p: p[0])[1]
                per[f"{which}_us"] = min(ok, key=lambda p: p[0])[0]
    return tuned


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write every row and the best tiles per shape as JSON here "
                                                "(benchmarks/run_all.py --train-tiles reads it)")
    ap.add_argument("--rows", type=int, default=4096, help="rows of x (batch x tokens)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20, help="calls per timing")
    ap.add_argument("--samples", type=int, default=15, help="timings per row (median)")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds after which the sweeps stop")
    ap.add_argument("--passes", default="rows,fwd,dx,grads", help="the passes to sweep, in this order (comma "
                                                                  "separated; the others keep their tiles)")
    ap.add_argument("--tiny", action="store_true", help="small shapes, few iterations (a CPU smoke test with "
                                                        "TRITON_INTERPRET=1)")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shapes, sweeps = SHAPES, {"rows": ROWS_SWEEP, "fwd": GEMM_SWEEP, "dx": GEMM_SWEEP, "grads": GRADS_SWEEP}
    if args.tiny:
        shapes = [(n, i // 32 + 16, o // 32 + 8, d) for n, i, o, d in SHAPES]
        args.rows, args.reps, args.samples = 80, 1, 1
        small = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 1}
        sweeps = {"rows": [{"BLOCK_M": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}], "fwd": [small],
                  "dx": [small], "grads": [{"BLOCK_F": 32, "BLOCK_M": 32, "num_warps": 4, "num_stages": 1}]}
        for which, configs in sweeps.items():
            lt.DEFAULTS[which] = dict(configs[0])
    passes = args.passes.split(",")
    if set(passes) - set(sweeps):
        sys.exit(f"tune_train.py: --passes takes {','.join(sweeps)}, got {args.passes}")
    sweeps = {which: sweeps[which] for which in passes}
    if dev == "cpu" and not lt._INTERPRET:
        sys.exit("tune_train.py needs a CUDA GPU (or TRITON_INTERPRET=1 with --tiny for a smoke test of the script)")
    torch.backends.cuda.matmul.allow_tf32 = False
    info = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
            "triton": getattr(lt.triton, "__version__", None), "rows": args.rows, "rank": args.rank}
    print(json.dumps(info), flush=True)
    t0 = time.perf_counter()
    cases = [Case(label, i, o, d, args.rows, args.rank, dev) for label, i, o, d in shapes]
    core = {}
    for case in cases:
        core[case.label] = core_rows(case, args)
        print(f"{case.label}: " + ", ".join(f"{k} {v:.4g}" for k, v in core[case.label].items()), flush=True)
    deadline = t0 + args.budget
    swept = {which: sweep(cases, which, configs, args, deadline) for which, configs in sweeps.items()}
    tuned = best_tiles(cases, swept)
    errs = [r["max_rel_err"] for r in core.values()]
    verdict = all(e < MAX_REL_ERR for e in errs)
    print(f"\nper layer, us (M = {args.rows}, rank {args.rank}); kernels at the tiles in use, then the best swept:")
    print(f"{'layer':12} {'cuBLAS f+dx':>11} {'pytorch f+b':>11} {'fused':>8} {'best':>8} | "
          f"{'step frozen':>11} {'pytorch':>8} {'fused':>8}")
    for case in cases:
        r, b = core[case.label], tuned.get(f"{case.n_in}x{case.n_out}", {})
        best = sum(b.get(f"{w}_us", float("nan")) for w in ("fwd", "dx", "grads"))  # fwd, dx include their rows passes
        print(f"{case.label:12} {r['cublas_fwd'] + r['cublas_dx']:11.1f} {r['pytorch_fwd'] + r['pytorch_bwd']:11.1f} "
              f"{r['fused_fwd'] + r['fused_dx'] + r['fused_grads']:8.1f} {best:8.1f} | {r['layer_frozen']:11.1f} "
              f"{r['layer_pytorch']:8.1f} {r['layer_fused']:8.1f}")
    print(f"check: fused == float64 within {MAX_REL_ERR:g} relative: {'PASS' if verdict else 'FAIL'} "
          f"(worst {max(errs):.1e}), {time.perf_counter() - t0:.1f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"info": info, "core": core, "sweeps": swept, "tuned": tuned,
                                              "check_passed": verdict}, indent=1, default=str))


if __name__ == "__main__":
    main()
