"""Training-step rows: frozen floor vs ours vs PEFT, eager and torch.compile, time and peak memory.

One step = forward under bf16 autocast + loss + backward (+ AdamW on the LoRA parameters). The "frozen
floor" is the same base with every weight frozen and input grads on: the backward a LoRA step cannot avoid.
"ours_r8" takes the fused Triton kernels where they apply (CUDA); "ours_r8_pytorch" the PyTorch fast path.
"""
from __future__ import annotations

import copy
import time

import torch

from .harness import peak_step_bytes, sync, time_interleaved
from lora_engine import LoRALayer, compiled_op, lora_layers, train_casts
from lora_engine.training.loop import _cast_frozen  # what scripts/train.py --base-dtype bf16 does to the base

from .models import add_ours, add_peft, build_base, gpt_config, lora_parameters


def pytorch_path(model):
    """Ours without the fused training kernels (kernels/lora_train_triton.py): the PyTorch fast path, for the same
    process comparison."""
    for layer in lora_layers(model).values():
        layer.fused_training = False
    return model


def _step_fn(model, x, optimizer, input_grad: bool):
    def step():
        xin = x.detach().requires_grad_(True) if input_grad else x
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            out = model(inputs_embeds=xin, use_cache=False).last_hidden_state  # training: no KV cache (and no
            # recompiles under torch.compile for each block's cache state)
        loss = out.float().square().mean()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step


def _trainer(model, x):
    # The same optimizer on both sides: fused AdamW on CUDA (one kernel for all LoRA tensors), as train.py uses.
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-4, fused=True if x.is_cuda else None)
    return model, opt, _step_fn(model, x, opt, input_grad=False)


def run(res: dict, args) -> None:
    dev = args.device
    cfg = gpt_config(args.tiny)
    B, T = (2, 16) if args.tiny else (8, 512)
    base = build_base(cfg, dev, torch.float32)
    x = torch.randn(B, T, cfg.n_embd, device=dev)
    variants = {"frozen_floor": (base, None, _step_fn(base, x, None, input_grad=True))}
    variants["ours_r8"] = _trainer(add_ours(copy.deepcopy(base), ["a0"], 8), x)
    variants["ours_r16"] = _trainer(add_ours(copy.deepcopy(base), ["a0"], 16), x)
    cast = add_ours(copy.deepcopy(base), ["a0"], 8)  # ours with the base cast in every pass (no kept cast base)
    for layer in lora_layers(cast).values():
        layer.keep_cast_base = False
    variants["ours_r8_cast_base"] = _trainer(cast, x)
    variants["ours_r8_pytorch"] = _trainer(pytorch_path(add_ours(copy.deepcopy(base), ["a0"], 8)), x)
    variants["peft_r8"] = _trainer(add_peft(copy.deepcopy(base), ["a0"], 8), x)

    times = time_interleaved({k: v[2] for k, v in variants.items()}, warmup=args.warmup, iters=args.iters)
    mem = {k: peak_step_bytes(v[2], v[0], v[1]) for k, v in variants.items()}
    res["train_eager"] = {"times": times, "memory": mem, "shape": f"B{B} T{T} bf16 autocast, fp32 base"}
    t = {k: v["median_ms"] for k, v in times.items()}
    res["ratios"]["train_eager_r8_vs_frozen_floor"] = _ratio(t["ours_r8"], t["frozen_floor"])
    res["ratios"]["train_eager_r16_vs_frozen_floor"] = _ratio(t["ours_r16"], t["frozen_floor"])
    res["ratios"]["train_eager_r8_vs_peft"] = _ratio(t["ours_r8"], t["peft_r8"])
    if mem["ours_r8"]["peak_bytes"] is not None:
        res["ratios"]["train_peak_mem_r8_vs_peft"] = _ratio(mem["ours_r8"]["peak_bytes"] / 2**30,
                                                            mem["peft_r8"]["peak_bytes"] / 2**30, unit="GiB")
        res["ratios"]["train_peak_mem_r8_vs_frozen_floor"] = _ratio(mem["ours_r8"]["peak_bytes"] / 2**30,
                                                                    mem["frozen_floor"]["peak_bytes"] / 2**30, unit="GiB")
    if dev == "cuda":
        _bf16_base_memory(res, mem, base, x)
    res["ratios"]["train_eager_r8_cast_base_vs_frozen_floor"] = _ratio(t["ours_r8_cast_base"], t["frozen_floor"])
    res["ratios"]["train_eager_r8_pytorch_vs_frozen_floor"] = _ratio(t["ours_r8_pytorch"], t["frozen_floor"])
    res["ratios"]["train_eager_r8_fused_vs_pytorch"] = _ratio(t["ours_r8"], t["ours_r8_pytorch"])
    del variants["ours_r16"], variants["ours_r8_cast_base"], variants["ours_r8_pytorch"]
    if args.no_compile:
        return
    # ours in every form compiled_op.py gives dynamo: "ours_r8" in the default (LoRALayer.compiled_form), and the others
    wanted = compiled_op.FORMS if args.compiled_forms is None else args.compiled_forms
    others = [f for f in compiled_op.FORMS if f != LoRALayer.compiled_form and f in wanted]
    for form in others:
        model = add_ours(copy.deepcopy(base), ["a0"], 8)
        for layer in lora_layers(model).values():
            layer.compiled_form = form
        variants[f"ours_r8_{form}_form"] = _trainer(model, x)
    compiled, first = {}, {}
    for name in ("ours_r8", *(f"ours_r8_{f}_form" for f in others), "peft_r8", "frozen_floor"):
        model, opt, _ = variants[name]  # frozen_floor compiled: what no LoRA can go below
        if name.startswith("ours"):
            train_casts.prepare(model, torch.bfloat16)  # as the training loop does: the graph reads the kept casts
        cmodel = torch.compile(model)
        step = _step_fn(cmodel, x, opt, input_grad=name == "frozen_floor")
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        first[name] = time.perf_counter() - t0
        compiled[name] = step
    ctimes = time_interleaved(compiled, warmup=args.warmup, iters=args.iters)
    res["train_compiled"] = {"times": ctimes, "first_step_s": first}
    res["ratios"]["train_compiled_r8_vs_peft_compiled"] = _ratio(ctimes["ours_r8"]["median_ms"],
                                                                 ctimes["peft_r8"]["median_ms"])
    res["ratios"]["first_compile_s"] = {"value": first["ours_r8"], "peft_s": first["peft_r8"]}
    for form in others:
        res["ratios"][f"train_compiled_r8_{form}_form_vs_peft_compiled"] = _ratio(
            ctimes[f"ours_r8_{form}_form"]["median_ms"], ctimes["peft_r8"]["median_ms"])
    res["ratios"]["train_compiled_r8_vs_compiled_floor"] = _ratio(ctimes["ours_r8"]["median_ms"],
                                                                  ctimes["frozen_floor"]["median_ms"])
    res["ratios"]["train_compiled_peft_vs_compiled_floor"] = _ratio(ctimes["peft_r8"]["median_ms"],
                                                                    ctimes["frozen_floor"]["median_ms"])


def _bf16_base_memory(res: dict, mem: dict, base, x) -> None:
    """Peak memory with the frozen base stored in bf16, as `scripts/train.py --base-dtype bf16` stores it (the LoRA
    factors and AdamW state stay fp32; under bf16 autocast the forward and backward are bit-identical to casting an
    fp32 base in every pass). On every side: ours, PEFT and the floor, each measured after one warm-up step."""
    for name, add in (("frozen_floor", None), ("ours_r8", add_ours), ("peft_r8", add_peft)):
        model = copy.deepcopy(base) if add is None else add(copy.deepcopy(base), ["a0"], 8)
        _cast_frozen(model, torch.bfloat16)
        model, opt, step = (model, None, _step_fn(model, x, None, input_grad=True)) if add is None \
            else _trainer(model, x)
        step()
        mem[f"{name}_bf16_base"] = peak_step_bytes(step, model, opt)
        del model, opt, step
    gib = {k: v["peak_bytes"] / 2**30 for k, v in mem.items()}
    res["ratios"]["train_peak_mem_r8_bf16_base_vs_peft"] = _ratio(gib["ours_r8_bf16_base"], gib["peft_r8"], "GiB")
    res["ratios"]["train_peak_mem_r8_bf16_base_vs_peft_bf16_base"] = _ratio(gib["ours_r8_bf16_base"],
                                                                            gib["peft_r8_bf16_base"], "GiB")
    res["ratios"]["train_peak_mem_r8_bf16_base_vs_frozen_floor_bf16_base"] = _ratio(
        gib["ours_r8_bf16_base"], gib["frozen_floor_bf16_base"], "GiB")


def _ratio(ours: float, ref: float, unit: str = "ms") -> dict:
    return {"value": ours / ref, f"ours_{unit}": ours, f"ref_{unit}": ref}
