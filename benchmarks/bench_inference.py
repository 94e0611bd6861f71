"""Inference rows (bf16 weights, bf16 autocast, no grad): one-token decode at batch 1 with one adapter and
with four blended, eager and CUDA-graphed; a B8 T512 prefill with a different adapter on every row."""
from __future__ import annotations

import copy

import torch

from lora_engine import set_blend

from .harness import time_interleaved
from .models import add_ours, add_peft, build_base, gpt_config

BLEND4 = {"a0": 0.4, "a1": 0.3, "a2": 0.2, "a3": 0.1}


def _fwd(model, x, **kw):
    def f():
        with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16):
            return model(inputs_embeds=x, use_cache=False, **kw).last_hidden_state
    return f


def _graphed(fn):
    """Capture fn once into a CUDA graph; returns (replay, the graph's output tensor)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g.replay, out


def run(res: dict, args) -> None:
    dev = args.device
    cfg = gpt_config(args.tiny)
    base = build_base(cfg, dev, torch.bfloat16).eval()
    ours1 = add_ours(copy.deepcopy(base), ["a0"]).eval()
    ours4 = add_ours(copy.deepcopy(base), list(BLEND4)).eval()
    set_blend(ours4, BLEND4)
    peft1 = add_peft(copy.deepcopy(base), ["a0"]).eval()
    peft4 = add_peft(copy.deepcopy(base), list(BLEND4)).eval()
    peft4.base_model.set_adapter(list(BLEND4))  # PEFT sums active adapters one kernel chain each (no weights)
    x1 = torch.randn(1, 1, cfg.n_embd, device=dev, dtype=torch.bfloat16)
    fns = {"base": _fwd(base, x1), "ours_1": _fwd(ours1, x1), "ours_blend4": _fwd(ours4, x1),
           "peft_1": _fwd(peft1, x1), "peft_4": _fwd(peft4, x1)}
    if args.check:
        _check_close(fns["ours_1"](), _fwd(peft1, x1)(), "decode ours vs PEFT (1 adapter)")
    eager = time_interleaved(fns, warmup=args.warmup, iters=max(args.iters, 50))
    res["decode_eager"] = eager
    t = {k: v["median_ms"] for k, v in eager.items()}
    res["ratios"]["decode_unmerged_vs_base"] = _ratio(t["ours_1"], t["base"], peft=t["peft_1"])
    res["ratios"]["decode_blend4_vs_base"] = _ratio(t["ours_blend4"], t["base"], peft=t["peft_4"])
    if dev == "cuda":
        try:
            captured = {k: _graphed(f) for k, f in fns.items()}
            graphed = {k: replay for k, (replay, _) in captured.items()}
            if args.check:  # the replayed graphs (decode kernel, SPLIT scratch included) give the eager output
                for k in ("ours_1", "ours_blend4"):
                    replay, out = captured[k]
                    for _ in range(2):
                        replay()
                    _check_close(out, fns[k](), f"decode {k} CUDA graph replay vs eager")
            g = time_interleaved(graphed, warmup=args.warmup, iters=max(args.iters, 50))
            res["decode_cuda_graph"] = g
            t = {k: v["median_ms"] for k, v in g.items()}
            res["ratios"]["decode_unmerged_vs_base_graphed"] = _ratio(t["ours_1"], t["base"], peft=t["peft_1"])
            res["ratios"]["decode_blend4_vs_base_graphed"] = _ratio(t["ours_blend4"], t["base"], peft=t["peft_4"])
        except Exception as e:  # record and go on: one failed row must not hide the others
            res["errors"]["decode_cuda_graph"] = repr(e)
    del ours1, ours4, peft1, peft4, fns

    B, T = (2, 8) if args.tiny else (8, 512)
    names = [f"a{i}" for i in range(B)]
    oursB = add_ours(copy.deepcopy(base), names).eval()
    set_blend(oursB, {n: torch.eye(B, device=dev)[i] for i, n in enumerate(names)})
    peftB = add_peft(copy.deepcopy(base), names).eval()
    xB = torch.randn(B, T, cfg.n_embd, device=dev, dtype=torch.bfloat16)
    fns = {"base": _fwd(base, xB), "ours_mixed": _fwd(oursB, xB), "peft_mixed": _fwd(peftB, xB, adapter_names=names)}
    if args.check:
        _check_close(fns["ours_mixed"](), fns["peft_mixed"](), "prefill per-row adapters ours vs PEFT")
    pre = time_interleaved(fns, warmup=args.warmup, iters=args.iters)
    res["prefill_mixed"] = pre
    t = {k: v["median_ms"] for k, v in pre.items()}
    res["ratios"]["prefill_mixed_batch_vs_base"] = _ratio(t["ours_mixed"], t["base"], peft=t["peft_mixed"])


def _check_close(a, b, what: str) -> None:
    err = ((a.float() - b.float()).norm() / b.float().norm()).item()
    assert err < 2e-2, f"--check: {what}: relative error {err:.2e}"
    print(f"check ok: {what}: rel err {err:.2e}")


def _ratio(ours: float, ref: float, peft: float | None = None) -> dict:
    out = {"value": ours / ref, "ours_ms": ours, "ref_ms": ref}
    if peft is not None:
        out["peft_ms"] = peft
    return out
