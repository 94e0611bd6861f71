"""Triton helpers that give the GPU's results in Triton's CPU interpreter too (the CI tests run kernels there).

Triton's interpreter (TRITON_INTERPRET=1) multiplies bf16 as raw integers and truncates fp32 -> bf16; the constexpr
INTERPRETER switches in exact workarounds there (fp32 products, round-to-nearest on the bits).
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def dot(a, b, acc, INTERPRETER: tl.constexpr):
        """acc + a @ b, fp32 accumulation. Triton's interpreter multiplies bf16 as raw integers, so there the operands
        go to fp32 first: exact too, a product of two 16-bit floats fits in fp32."""
        if INTERPRETER:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            out = tl.dot(a, b, acc)
        return out

    @triton.jit
    def round_to(v, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
        """v rounded to nearest even in `dtype`. Triton's interpreter truncates fp32 -> bf16, so there the rounding is
        done on the fp32 bits first and the truncation that follows is exact."""
        if INTERPRETER and dtype == tl.bfloat16:
            bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            out = bits.to(tl.float32, bitcast=True).to(dtype)
        else:
            out = v.to(dtype)
        return out
