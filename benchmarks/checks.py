"""`--check`: on the benchmark's device, the fast paths (and Triton kernels, where they run) against the plain
reference path: forward and gradients, one and several adapters, per-row mixes, merge/unmerge bits."""
from __future__ import annotations

import torch

from lora_engine import functional as Fn


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


def run(res: dict, args) -> None:
    dev = args.device
    lines = []
    for layout in ("out_in", "in_out"):
        for n in (1, 3):
            for per_row in (False, True):
                for dtype in (torch.float32, torch.bfloat16):
                    lines.append(check_linear(dev, layout, n, per_row, dtype))
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
