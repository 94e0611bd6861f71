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

TMA kernels take their tiled operands as `Tiled` (a host TensorDescriptor's fields); see Tiled for the trap there.
"""
from __future__ import annotations

import functools
import re
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

try:
    import triton
except ImportError:  # the CPU wheel has no triton: the layers use their PyTorch paths
    triton = None
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # no triton, or one before host tensor descriptors (3.4): no TMA path
    TensorDescriptor = None

MAX_TENSOR_MAPS = 4096  # per kernel and descriptor argument; then the cache starts again


class Tiled(NamedTuple):
    """A 2-D tensor a TMA kernel reads or writes in `block` tiles: the fields of Triton's host TensorDescriptor
    (elements of `base` at base + i strides[0] + j strides[1], strides[1] == 1), which is built only where Triton's
    own launch needs one. Trap: for a kernel with descriptor arguments, triton 3.6 wraps the C launch in Python that
    turns every descriptor into a CUtensorMap on every launch (make_tensordesc_arg: a TensorDescriptor's checks,
    then the driver's cuTensorMapEncodeTiled; three per fused GEMM). A direct launch keeps the maps
    instead, keyed on what they encode (address, shape, strides): the same activation buffers come back every
    step from PyTorch's caching allocator, the weights never move."""
    base: Tensor
    shape: tuple
    strides: tuple
    block: tuple

    def descriptor(self):
        return TensorDescriptor(self.base, list(self.shape), list(self.strides), list(self.block))


def tma_supported(t: Tensor) -> bool:
    """Whether kernels may read `t` through TMA descriptors: a triton with host descriptors, and a CUDA device of
    compute capability >= 9 (Hopper's TMA unit; older GPUs would get the descriptors lowered to pointer loads),
    or Triton's interpreter on CPU (the caller knows it is interpreting)."""
    return TensorDescriptor is not None and (not t.is_cuda or _capability(t.get_device()) >= 9)


@functools.lru_cache(maxsize=None)
def _capability(device: int) -> int:
    return torch.cuda.get_device_capability(device)[0]


def tma_aligned(t: Tensor, strides: tuple) -> bool:
    """What a TensorDescriptor asks of its base: 16-byte aligned address and row stride, unit inner stride."""
    return strides[-1] == 1 and not t.data_ptr() & 15 and not (strides[0] * t.element_size()) & 15


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
    tensor, and Triton raises as it would. A Tiled: its dtype and block (Triton's "tensordesc<bf16[128, 64]>"),
    kept as it is (the launch expands it). Runs on every launch: a scalar's part comes from a cache."""
    spec, raw = [], []
    for a in args:
        if type(a) is Tiled:
            spec.append((a.base.dtype, a.block))
            raw.append(a)
        elif isinstance(a, Tensor):
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


def _entry(kernel, kw: dict, constexprs: tuple, args: tuple) -> tuple | None:
    """(kw, launch, head, constexprs, tiled): a direct launch is launch(grid0, grid1, grid2, stream, *head,
    *arguments, *constexprs), each Tiled argument i expanded by tiled[i]. Trap: CompiledKernel.run
    (CudaLauncher.__call__) is Python too, two scratch allocations that are None for kernels that need no
    scratch, then its C launch; triton 3.6's C launch is called straight: launch(grid, stream, function,
    cooperative, pdl, global scratch, profile scratch, packed metadata, launch metadata, enter hook, exit hook,
    *arguments), a descriptor given as its CUtensorMap, shape and strides (_TensorMaps). Any other triton or a
    kernel with scratch: run itself, given TensorDescriptors. None: no direct launch (a TMA kernel whose C launch
    cannot be found under 3.6's wrapper)."""
    run = kernel.run
    positions = [i for i, a in enumerate(args) if type(a) is Tiled]
    if (triton is not None and triton.__version__.startswith("3.6.") and callable(getattr(run, "launch", None))
            and getattr(run, "global_scratch_size", 1) == 0 and getattr(run, "profile_scratch_size", 1) == 0):
        head = (kernel.function, run.launch_cooperative_grid, run.launch_pdl, None, None, kernel.packed_metadata,
                None, None, None)
        if not positions:
            return kw, run.launch, head, constexprs, {}
        launch = _wrapped_launch(run.launch)
        if launch is None:
            return None
        metas = getattr(kernel.metadata, "tensordesc_meta", None) or [None] * len(positions)
        encode = _encoder()
        return kw, launch, head, constexprs, {i: _TensorMaps(meta, encode) for i, meta in zip(positions, metas)}
    head = (kernel.function, kernel.packed_metadata, None, None, None)
    return kw, run, head, constexprs, {i: _as_descriptor for i in positions}


def _wrapped_launch(wrapper):
    """The C launch that triton 3.6's wrap_handle_tensordesc closes over (its `launcher`), or None."""
    cells = dict(zip(getattr(getattr(wrapper, "__code__", None), "co_freevars", ()), wrapper.__closure__ or ()))
    launch = cells["launcher"].cell_contents if "launcher" in cells else None
    return launch if callable(launch) else None


def _encoder():
    """triton 3.6's make_tensordesc_arg(descriptor, metadata) -> [CUtensorMap, *shape, *strides]."""
    from triton.backends.nvidia.driver import make_tensordesc_arg
    return make_tensordesc_arg


def _as_descriptor(t: Tiled) -> tuple:
    return (t.descriptor(),)


class _TensorMaps:
    """Tiled -> the C launch's arguments for one descriptor parameter of one compiled kernel: (CUtensorMap, *shape,
    *strides) from Triton's own make_tensordesc_arg with the kernel's descriptor metadata (swizzle, box), made
    once per address, shape and strides. Metadata None (descriptors lowered to pointers): (address, *shape,
    *strides, nan padding, *shape, *strides), as make_tensordesc_arg decomposes them."""

    def __init__(self, meta, encode):
        self.meta, self.encode, self.maps = meta, encode, {}

    def __call__(self, t: Tiled) -> tuple:
        ptr = t.base.data_ptr()
        key = (ptr, t.shape, t.strides)
        hit = self.maps.get(key)
        if hit is None:
            if len(self.maps) >= MAX_TENSOR_MAPS:
                self.maps.clear()
            if self.meta is None:
                hit = (ptr, *t.shape, *t.strides, False, *t.shape, *t.strides)
            else:
                hit = tuple(self.encode(t.descriptor(), self.meta))
            self.maps[key] = hit
        return hit


def _expand(raw: tuple, tiled: dict) -> tuple:
    """The launch's arguments: each Tiled at position i replaced by what tiled[i] makes of it."""
    out = []
    for i, a in enumerate(raw):
        if i in tiled:
            out.extend(tiled[i](a))
        else:
            out.append(a)
    return tuple(out)


def _jit_args(args: tuple) -> tuple:
    """args for Triton's own launch: each Tiled as the TensorDescriptor it stands for."""
    return tuple(a.descriptor() if type(a) is Tiled else a for a in args)


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
            self.jit_fn[grid](*_jit_args(args), **kw)
            self.launches["jit"] += 1
            return
        device = _current_device()
        spec, raw = specialized(args, device if self.raw_pointers else None)
        dkey = (key, id(kw), device, spec)
        hit = self.compiled.get(dkey, False)
        if hit and hit[0] is kw:  # compiled for these launch parameters (the id of a freed kw may come back)
            _, launch, head, constexprs, tiled = hit
            n = len(grid)
            try:
                if tiled:
                    raw = _expand(raw, tiled)
                launch(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1,
                       torch._C._cuda_getCurrentRawStream(device), *head, *raw, *constexprs)
                self.launches["direct"] += 1
                return
            except Exception as err:  # another triton's launcher? JIT from now on (a relaunch rewrites the outputs)
                warnings.warn(f"{self.name}: direct launch failed ({err!r}); this launch key takes Triton's JIT "
                              f"launch from now on")
                self.compiled[dkey] = hit = None
        kernel = self.jit_fn[grid](*_jit_args(args), **kw)  # triton 3.x returns the CompiledKernel it launched
        self.launches["jit"] += 1
        if hit is not None:  # the first launch of this key and specialization, or the tiles changed
            ok = getattr(kernel, "function", None) is not None and hasattr(kernel, "packed_metadata")
            constexprs = tuple(kw[name] for name in self.jit_fn.arg_names[len(args):])  # in signature order
            self.compiled[dkey] = _entry(kernel, kw, constexprs, args) if ok else None
