"""The training LoRA linear in the forms torch.compile can see, chosen per layer by `LoRALayer.compiled_form`.

On the H200 host every cuBLAS call costs ~40 us of CPU (dispatch, heuristics, launch), and a compiled training step
is as much host-bound as an eager one (benchmarks/NOTES.md (13), (19)). Measured side by side (bench_train.py, v8b):
  "rank1"  (the default) functional._LoRALinearFn with the up-projections y += (h d) B^T and dx += (u d) A as R
           rank-1 terms (functional.add_product), a pointwise expression Inductor fuses into the neighbouring kernels:
           four cuBLAS calls per layer beyond the base's two (h = x A^T, u = dy B, dA, dB). 0.91x PEFT's compiled step;
           its first compiled step takes ~2x longer (more fused kernels to generate: 129 s vs 68 s).
  "gemm"   the same Function with every product a cuBLAS call: six per layer beyond the base's two. 1.02x PEFT.
  "cat"    "rank1" with h and u from the base's own GEMMs: forward x [W; A]^T = [base | h], backward
           dy [W^T | B] = [dx's base part | u]: two cuBLAS calls per layer beyond the base's two (dA, dB). 1.06x PEFT:
           the concatenated weights are written in every step (a copy of W forward and backward that the base's
           plain cast does not make) and the [base | h] output is read strided, which costs more than the calls
           saved.
With the kept cast base (train_casts.py: the frozen W cast once, A's rows appended; made by train_casts.prepare before
tracing) "rank1" takes h from the base GEMM and casts no W in either pass: 0.83x PEFT (v12), three cuBLAS calls per
layer beyond the base's two (u, dA, dB).
Tried and measured worse: every rank-sized product as an Inductor reduction (Inductor fused them with the GELU
backward and recomputed it per rank: 1.17x PEFT, kernel time 3x the floor's), and the eager code as opaque
torch.library ops (the Python of every op call came back: 1.38x PEFT).
"""
from __future__ import annotations

from torch import Tensor

from .functional import _LoRALinearFn

FORMS = ("gemm", "rank1", "cat")


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, d: Tensor, layout: str,
                s: float | None = None, form: str = "rank1", kept=None) -> Tensor:
    """functional.lora_linear's training form while dynamo traces, in `form` (one of FORMS, see above).

    `kept`: the tensors of the layer's train_casts.Copies with the cast base, made before tracing (train_casts.prepare) and refreshed
    in place after every optimizer step: the graph then reads the kept [W; A_c] (h from the base GEMM, no cast of W
    in either pass) and the up-projections stay rank-1 terms ("rank1"); None: `form` as it is."""
    if form not in FORMS:
        raise ValueError(f"LoRALayer.compiled_form must be one of {FORMS}, got {form!r}")
    return _LoRALinearFn.apply(x, weight, bias, A, B, d, s, layout, kept, form)
