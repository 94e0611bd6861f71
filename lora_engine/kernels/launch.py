"""Launching a Triton kernel without Triton's per-call Python, and the switch for Triton's CPU interpreter.

The trap: Triton's JITFunction.run binds and specializes every argument, builds its cache key and launch metadata
in Python on every call, ~25-30 us of host time per launch on the H200 (triton 3.6), more than a decode kernel
runs and as much as a cuBLAS call costs the training step. So the CompiledKernel that run returns is kept and
launched the way run itself launches it (written against triton 3.6 runtime/jit.py, the same in 3.9; older
versions take the JIT path):
    kernel.run(grid0, grid1, grid2, stream, kernel.function, kernel.packed_metadata, launch_metadata,
               launch_enter_hook, launch_exit_hook, *every argument in signature order, constexprs included)
The launcher ignores what it is passed for a constexpr, including an int Triton made one (== 1), and trusts the
alignment the kernel was compiled for: a call Triton would specialize differently (M == 1, a misaligned pointer)
must reach JIT and its own kernel, so `specialization` is part of the key. Launch hooks keep the JIT path.
"""
from __future__ import annotations

import functools
import re
import warnings

import torch
from torch import Tensor

try:
    import triton
except ImportError:  # the CPU wheel has no triton: the layers use their PyTorch paths
    triton = None


def interpreting(jit_fn) -> bool:
    """Whether `jit_fn` runs in Triton's interpreter (TRITON_INTERPRET=1: CPU tensors, the CI tests)."""
    return type(jit_fn).__name__ == "InterpretedFunction"


def direct_supported() -> bool:
    """Whether the installed triton's CompiledKernel.run takes the arguments written above (3.6 and later)."""
    return triton is not None and tuple(map(int, re.findall(r"\d+", triton.__version__)[:2])) >= (3, 6)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for grid sizes. Trap: triton.cdiv is a ConstexprFunction in triton 3.9 (it unwraps constexprs on
    every call, ~5 us of host time each: three per training layer and step)."""
    return -(-a // b)


def specialization(args: tuple) -> tuple:
    """What Triton specializes a launch on beyond the launch key: each pointer's dtype and 16-byte alignment; each
    int's == 1 (then a constexpr), % 16 == 0 and 32-bit range (triton 3.6 `native_specialize_impl`); floats
    nothing (always fp32); a bool its value (a constexpr passed by position)."""
    return specialized(args)[0]


def specialized(args: tuple, device: int | None = None) -> tuple[tuple, tuple]:
    """(specialization(args), the arguments to launch with): every tensor on CUDA device `device` replaced by its
    data_ptr(). Trap: given a tensor, Triton's C launcher calls its data_ptr() and then cuPointerGetAttribute, a
    driver call per pointer argument and launch (six in a fused training GEMM); given an int it takes the address
    as it is. The check that cuPointerGetAttribute made (a device pointer) is made here: a tensor elsewhere stays a
    tensor, and Triton raises as it would. Runs on every launch: a scalar's part comes from a cache."""
    spec, raw = [], []
    for a in args:
        if isinstance(a, Tensor):
            ptr = a.data_ptr()
            spec.append((a.dtype, not ptr & 15))
            raw.append(ptr if device is not None and a.is_cuda and a.get_device() == device else a)
        else:
            spec.append(_scalar_spec(a))
            raw.append(a)
    return tuple(spec), tuple(raw)


@functools.lru_cache(maxsize=4096, typed=True)  # typed: True and 1 are told apart
def _scalar_spec(a) -> object:
    """A bool: its value; an int (an int subclass too; numpy ints are not ints): == 1, % 16 == 0, 32-bit range;
    anything else (floats): nothing."""
    if type(a) is bool:
        return a
    if isinstance(a, int):
        return (a == 1, not a % 16, -2**31 <= a < 2**31)
    return None


def _jit_only(jit_fn) -> bool:
    """Whether a launch needs what only JITFunction.run does: launch hooks (profilers), pre-run hooks, TRITON_DEBUG."""
    rt = triton.knobs.runtime
    enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
    return bool(getattr(enter, "calls", enter) or getattr(leave, "calls", leave) or jit_fn.pre_run_hooks
                or rt.debug)  # HookChain (.calls) in 3.6, a plain callable or None before


def _current_device() -> int:
    return torch._C._cuda_getDevice()  # torch.cuda.current_device() less its Python (CUDA is up: JIT ran first)


def _entry(kernel, kw: dict, constexprs: tuple) -> tuple:
    """(kw, launch, head, constexprs): a direct launch is launch(grid0, grid1, grid2, stream, *head, *arguments,
    *constexprs). Trap: CompiledKernel.run (CudaLauncher.__call__) is Python too, two scratch allocations that
    are None for kernels that need no scratch, then its C launch; triton 3.6's C launch is called straight:
    launch(grid, stream, function, cooperative, pdl, global scratch, profile scratch, packed metadata, launch
    metadata, enter hook, exit hook, *arguments). Any other triton or a kernel with scratch: run itself."""
    run = kernel.run
    if (triton is not None and triton.__version__.startswith("3.6.") and callable(getattr(run, "launch", None))
            and getattr(run, "global_scratch_size", 1) == 0 and getattr(run, "profile_scratch_size", 1) == 0):
        head = (kernel.function, run.launch_cooperative_grid, run.launch_pdl, None, None, kernel.packed_metadata,
                None, None, None)
        return kw, run.launch, head, constexprs
    return kw, run, (kernel.function, kernel.packed_metadata, None, None, None), constexprs


class DirectLauncher:
    """`jit_fn[grid](*args, **kw)`, launched straight through its CompiledKernel after the first JIT launch of each
    launch key, `kw` object, device and specialization. `kw` (the constexprs and launch options) is told apart by
    identity, not compared: callers keep one object per configuration (a new object, e.g. other tiles, compiles
    again; two live ones under one key never take turns evicting each other). `enabled = False`: always JIT.
    `raw_pointers = False`: direct launches take the tensors themselves (`specialized`)."""

    raw_pointers = True

    def __init__(self, jit_fn, name: str):
        self.jit_fn, self.name, self.enabled = jit_fn, name, True
        self.direct = direct_supported() and not interpreting(jit_fn)
        self.compiled: dict[tuple, tuple | None] = {}  # key, kw id, device, specialization -> _entry or None
        self.launches = {"direct": 0, "jit": 0}  # how each call went (benchmarks/host_train.py reports them)

    def __call__(self, grid: tuple, args: tuple, kw: dict, key) -> None:
        if not (self.direct and self.enabled) or _jit_only(self.jit_fn):
            self.jit_fn[grid](*args, **kw)
            self.launches["jit"] += 1
            return
        device = _current_device()
        spec, raw = specialized(args, device if self.raw_pointers else None)
        dkey = (key, id(kw), device, spec)
        hit = self.compiled.get(dkey, False)
        if hit and hit[0] is kw:  # compiled for these launch parameters (the id of a freed kw may come back)
            _, launch, head, constexprs = hit
            n = len(grid)
            try:
                launch(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1,
                       torch._C._cuda_getCurrentRawStream(device), *head, *raw, *constexprs)
                self.launches["direct"] += 1
                return
            except Exception as err:  # another triton's launcher? JIT from now on (a relaunch rewrites the outputs)
                warnings.warn(f"{self.name}: direct launch failed ({err!r}); this launch key takes Triton's JIT "
                              f"launch from now on")
                self.compiled[dkey] = hit = None
        kernel = self.jit_fn[grid](*args, **kw)  # triton 3.x returns the CompiledKernel it launched
        self.launches["jit"] += 1
        if hit is not None:  # the first launch of this key and specialization, or the tiles changed
            ok = getattr(kernel, "function", None) is not None and hasattr(kernel, "packed_metadata")
            constexprs = tuple(kw[name] for name in self.jit_fn.arg_names[len(args):])  # in signature order
            self.compiled[dkey] = _entry(kernel, kw, constexprs) if ok else None
