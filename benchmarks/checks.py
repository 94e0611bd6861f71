"""`--check`: on the benchmark's device, the fast paths (and Triton kernels, where they run) against the plain
reference path: forward and gradients, one and several adapters, per-row mixes, merge/unmerge bits."""
from __future__ import annotations

import copy

import torch

from lora_engine import functional as Fn
from lora_engine import lora_layers

from .models import add_ours, build_base, gpt_config, lora_parameters


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check_linear(dev: str, layout: str, n_adapters: int, per_row: bool, dtype: torch.dtype) -> str:
    torch.manual_seed(n_adapters + 10 * per_row)
    Bt, T, fin, fout, r = 3, 17, 96, 80, 8
    W = torch.randn(fout, fin, device=dev) * 0.05
    W = (W if layout == "out_in" else W.t().contiguous()).to(dtype)
    bias = (torch.randn(fout, device=dev) * 0.1).to(dtype)
    As = [torch.randn(r, fin, device=dev, requires_grad=True) for _ in range(n_adapters)]
    Bs = [torch.randn(fout, r, device=dev, requires_grad=True) for _ in range(n_adapters)]
    ws = [torch.rand(Bt, device=dev) if per_row else torch.tensor(0.3 + i, device=dev) for i in range(n_adapters)]
    x = torch.randn(Bt, T, fin, device=dev, dtype=dtype, requires_grad=True)
    dy = torch.randn(Bt, T, fout, device=dev)

    def grads(y):
        return torch.autograd.grad(y.float().mul(dy).sum(), [x, *As, *Bs])

    autocast = torch.autocast(dev, dtype=torch.bfloat16, enabled=dtype == torch.float32)
    with autocast:
        y_ref = Fn.lora_linear_reference(x, W, bias, layout, As, Bs, [w * 2.0 for w in ws], [0.0] * n_adapters, True)
    g_ref = grads(y_ref)
    d = torch.cat([(w[:, None] if per_row else w.view(1)).expand(*(Bt,) if per_row else (), r) * 2.0 if per_row
                   else (w * 2.0).expand(r) for w in ws], dim=-1)
    with autocast:
        y = Fn.lora_linear(x, W, bias, torch.cat(As), torch.cat(Bs, 1), d, layout)
    g = grads(y)
    errs = [_rel(y, y_ref)] + [_rel(a, b) for a, b in zip(g, g_ref)]
    tol = 2e-2
    assert max(errs) < tol, f"fast path != reference ({layout}, {n_adapters} adapters, per_row={per_row}): {errs}"
    return f"{layout} n={n_adapters} per_row={per_row} {dtype}: max rel err {max(errs):.1e}"


def check_training_steps(dev: str, steps: int = 6) -> str:
    """After several steps of the training loop's optimizer (fused AdamW), the fast path's forward (the training form
    and the no-grad form) equals the plain reference path's with the same parameters: its kept casts and caches
    followed every step (a fused optimizer bumps no version counters: lora_engine/optimizer_steps.py)."""
    fast = add_ours(build_base(gpt_config(tiny=True), dev, torch.float32), ["a0"], 8)
    ref = copy.deepcopy(fast)
    for layer in lora_layers(ref).values():
        layer.use_reference = lambda *base: True  # plain autograd: nothing kept between steps
    x = torch.randn(2, 48, fast.config.n_embd, device=dev)  # 96 rows: the fused training kernels take it on CUDA

    def forward(model, grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(grad), torch.autocast(dev, dtype=torch.bfloat16):
            return model(inputs_embeds=x, use_cache=False).last_hidden_state.float().detach()
    before = forward(ref, True)
    opt = torch.optim.AdamW(lora_parameters(fast), lr=2e-2, fused=True)
    for _ in range(steps):
        forward(fast, False)  # an evaluation between steps builds the no-grad cache too
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = fast(inputs_embeds=x, use_cache=False).last_hidden_state.float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p, q in zip(lora_parameters(ref), lora_parameters(fast)):
            p.copy_(q)
    want = forward(ref, True)
    moved = _rel(want, before)
    errs = {"training form": _rel(forward(fast, True), want), "no-grad form": _rel(forward(fast, False), want)}
    grads = []
    for model in (fast, ref):  # and the gradients: the fast path's come from the kept cast base (train_casts.py)
        with torch.autocast(dev, dtype=torch.bfloat16):
            model(inputs_embeds=x, use_cache=False).last_hidden_state.float().square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in lora_parameters(model)]))
    errs["gradients"] = _rel(*grads)
    kept = sum(getattr(layer, "_train_casts").base is not None for layer in lora_layers(fast).values())
    assert kept == len(lora_layers(fast)), f"only {kept} of {len(lora_layers(fast))} layers kept their cast base"
    tol = 2e-2  # bf16 rounding through two blocks (~4e-3 on CPU); stale factors were 0.3 off (moved 0.3-0.7)
    assert moved > 10 * tol, f"{steps} steps moved the output by only {moved:.1e}: the check would not see stale factors"
    assert errs.pop("gradients") < 2 * tol, f"gradients of the fast path != reference's: {_rel(*grads):.1e}"  # CPU 1.2e-2
    assert max(errs.values()) < tol, (f"after {steps} fused-AdamW steps the fast path != reference: {errs} "
                                      f"(moved {moved:.1e})")
    return (f"{steps} fused-AdamW steps, fast path vs reference with the same parameters: rel err "
            f"{', '.join(f'{k} {v:.1e}' for k, v in errs.items())}, gradients {_rel(*grads):.1e} (the steps moved "
            f"the output {moved:.1e})")


def run(res: dict, args) -> None:
    dev = args.device
    lines = []
    for layout in ("out_in", "in_out"):
        for n in (1, 3):
            for per_row in (False, True):
                for dtype in (torch.float32, torch.bfloat16):
                    lines.append(check_linear(dev, layout, n, per_row, dtype))
    lines.append(check_training_steps(dev))
    lines += _check_kernels(dev)
    res["checks"] = lines
    print("\n".join(lines))


def _check_kernels(dev: str) -> list[str]:
    """Each Triton kernel against its Python reference (only where CUDA and triton exist)."""
    if dev != "cuda":
        return ["kernels: skipped (no CUDA)"]
    try:
        from lora_engine.kernels import selfcheck
    except ImportError:
        return ["kernels: none"]
    return selfcheck.run_all()
