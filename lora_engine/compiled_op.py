"""The training LoRA linear in the forms torch.compile can see, chosen per layer by `LoRALayer.compiled_form`.

On the H200 host every cuBLAS call costs ~40 us of CPU (dispatch, heuristics, launch), and a compiled training step
is as much host-bound as an eager one (benchmarks/NOTES.md (13)):
  "gemm"   (the default) functional._LoRALinearFn traced as it is: six cuBLAS calls per layer beyond the base's two.
           Measured 1.03x PEFT's compiled step (PEFT traces the same products).
  "rank1"  the same Function with the up-projections y += (h d) B^T and dx += (u d) A as R rank-1 terms
           (functional.add_product), a pointwise expression Inductor fuses into the neighbouring kernels: four
           cuBLAS calls per layer beyond the base's two (h = x A^T, u = dy B, dA, dB stay GEMMs). Correct and tested on CPU; its GPU time is not measured yet
           (benchmarks/bench_train.py times both forms side by side), so it is opt-in.
Tried and measured worse: every rank-sized product as an Inductor reduction (Inductor fused them with the GELU
backward and recomputed it per rank: 1.17x PEFT, kernel time 3x the floor's), and the eager code as opaque
torch.library ops (the Python of every op call came back: 1.38x PEFT).
"""
from __future__ import annotations

from torch import Tensor

from .functional import _LoRALinearFn

FORMS = ("gemm", "rank1")


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, d: Tensor, layout: str,
                s: float | None = None, form: str = "gemm") -> Tensor:
    """functional.lora_linear's training form while dynamo traces, in `form` ("gemm" or "rank1", see above)."""
    if form not in FORMS:
        raise ValueError(f"LoRALayer.compiled_form must be 'gemm' or 'rank1', got {form!r}")
    return _LoRALinearFn.apply(x, weight, bias, A, B, d, s, layout, None, form == "rank1")
