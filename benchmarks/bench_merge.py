"""Merge rows (bf16 weights, the deployed dtype): merge / unmerge of the whole GPT, a 4-adapter blend merged
exactly, bits changed after many merge+unmerge cycles; PEFT's merge_adapter / unmerge_adapter beside them."""
from __future__ import annotations

import copy
import time

import torch

from lora_engine import lora_layers, merge, unmerge

from .harness import summary, sync, time_once
from .models import add_ours, add_peft, build_base, gpt_config

BLEND4 = {"a0": 0.4, "a1": 0.3, "a2": 0.2, "a3": 0.1}


def _cycle_times(merge_fn, unmerge_fn, iters: int, warmup: int) -> tuple[dict, dict]:
    for _ in range(warmup):
        merge_fn()
        unmerge_fn()
    m, u = [], []
    for _ in range(iters):
        m.append(time_once(merge_fn))
        u.append(time_once(unmerge_fn))
    return summary(m), summary(u)


def _changed(model, originals: dict) -> int:
    n = 0
    for path, layer in lora_layers(model).items():
        w = layer.weight.detach()
        n += int((w.view(torch.int16) != originals[path].view(torch.int16)).sum())
    return n


def run(res: dict, args) -> None:
    dev = args.device
    cfg = gpt_config(args.tiny)
    base = build_base(cfg, dev, torch.bfloat16).eval()
    ours = add_ours(copy.deepcopy(base), list(BLEND4))
    originals = {p: l.weight.detach().clone() for p, l in lora_layers(ours).items()}
    iters = max(args.iters, 20)

    m1, u1 = _cycle_times(lambda: merge(ours, {"a0": 1.0}), lambda: unmerge(ours), iters, args.warmup)
    m4, u4 = _cycle_times(lambda: merge(ours, BLEND4), lambda: unmerge(ours), iters, args.warmup)
    res["merge"] = {"merge_1": m1, "unmerge_1": u1, "merge_blend4": m4, "unmerge_blend4": u4}
    res["ratios"]["merge_ms"] = {"value": m1["median_ms"]}
    res["ratios"]["unmerge_ms"] = {"value": u1["median_ms"]}
    res["ratios"]["blend4_merge_ms"] = {"value": m4["median_ms"], "unmerge_ms": u4["median_ms"]}

    # Exactness: N full cycles alternating one adapter and the 4-blend, then count changed elements.
    budget_s, cycles = args.restore_budget_s, 0
    sync()
    t0 = time.perf_counter()
    while cycles < args.restore_cycles and time.perf_counter() - t0 < budget_s:
        merge(ours, {"a0": 1.0} if cycles % 2 == 0 else BLEND4)
        unmerge(ours)
        cycles += 1
    sync()
    res["ratios"]["restore_bits_changed_after_1000"] = {"value": _changed(ours, originals), "cycles": cycles,
                                                        "seconds": time.perf_counter() - t0}
    del ours

    peft = add_peft(copy.deepcopy(base), ["a0"])
    porig = {n: p.detach().clone() for n, p in peft.named_parameters() if "base_layer.weight" in n}
    pm, pu = _cycle_times(peft.base_model.merge_adapter, peft.base_model.unmerge_adapter, iters, args.warmup)
    drift = max((p.detach().float() - porig[n].float()).abs().max().item()
                for n, p in peft.named_parameters() if n in porig)
    changed = sum(int((p.detach().view(torch.int16) != porig[n].view(torch.int16)).sum())
                  for n, p in peft.named_parameters() if n in porig)
    res["merge"]["peft"] = {"merge": pm, "unmerge": pu, "cycles": iters + args.warmup,
                            "max_abs_drift": drift, "elements_changed": changed}
    res["ratios"]["merge_ms"]["peft_ms"] = pm["median_ms"]
    res["ratios"]["unmerge_ms"]["peft_ms"] = pu["median_ms"]
