"""LoRA wrappers for nn.Linear, transformers Conv1D and nn.Embedding, each holding many named adapters.

A wrapper takes over the base module's own Parameter objects under their original names, so the
model's base state_dict() keys, storages and any references to them are unchanged; only
`<path>.lora_A.<adapter>` / `<path>.lora_B.<adapter>` keys are added.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import (base_linear, check_rows, compute_dtype, fold_scale, kept_lora_linear, lora_embedding,
                         lora_linear, lora_linear_cached, lora_linear_reference)
from . import compiled_op, optimizer_steps, train_casts
from .kernels import lora_gemv_triton, lora_train_triton
from .train_casts import cast_factors

BlendWeight = float | Tensor


class LoRALayer(nn.Module):
    """Common state: adapters (A [r, in], B [out, r]), their scales, the active blend, the merge record."""

    layout = "out_in"  # how the base weight is stored; "in_out" for Conv1D and Embedding
    compiled_form = "rank1"  # how torch.compile sees a training forward: one of compiled_op.FORMS
    keep_cast_base = True  # eager training under autocast keeps the cast base weight between steps (train_casts.py)
    fused_training = True  # eager training's usual case through kernels/lora_train_triton.py where it applies

    def __init__(self, base: nn.Module):
        super().__init__()
        self.weight = base.weight  # the same Parameter: same storage, same state_dict key
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}
        self.blend: dict[str, BlendWeight] = {}  # adapter -> weight (float, or [batch] tensor)
        self.register_buffer("blend_scale", torch.empty(0), persistent=False)  # d: [R] or [batch, R]
        self.merged = None  # a merge.MergeRecord while the delta sits in the base weight
        self.uniform_scale: float | None = None  # d when it is one value for every rank (training: GEMM alpha)
        self._factors = None  # inference cache: (key, A_cat cast, B_cat * d cast); see inference_factors
        object.__setattr__(self, "base_module", base)  # kept aside (not a submodule) for un-injection

    # ---- sizes -----------------------------------------------------------------------------------
    @property
    def in_dim(self) -> int:
        return self.weight.shape[1] if self.layout == "out_in" else self.weight.shape[0]

    @property
    def out_dim(self) -> int:
        return self.weight.shape[0] if self.layout == "out_in" else self.weight.shape[1]

    # ---- adapters --------------------------------------------------------------------------------
    def add_adapter(self, name: str, rank: int, scale: float, dropout: float, init: str) -> None:
        """Create A [rank, in] and B [out, rank] so that the delta starts at exactly zero."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        w = self.weight
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        A = torch.empty(rank, self.in_dim, dtype=dtype, device=w.device)
        B = torch.zeros(self.out_dim, rank, dtype=dtype, device=w.device)
        self._init(A, B, rank, init)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.scaling[name] = float(scale)
        self.dropout_p[name] = float(dropout)

    def _init(self, A: Tensor, B: Tensor, rank: int, init: str) -> None:
        if init == "gaussian":
            nn.init.normal_(A, std=1.0 / rank)
        else:  # "kaiming": the loralib / PEFT default
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))

    def remove_adapter(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name], self.scaling[name], self.dropout_p[name]
        if name in self.blend:
            self.set_blend({k: v for k, v in self.blend.items() if k != name})

    def factor_pair(self, name: str) -> tuple[Tensor, Tensor]:
        """(A, B) of one adapter: the ParameterDicts' own entries, read without nn.Module's attribute lookup."""
        modules = self._modules  # not nn.Module.__getattr__: this runs in every training forward
        A, B = modules["lora_A"]._parameters.get(name), modules["lora_B"]._parameters.get(name)
        return (A, B) if A is not None and B is not None else (self.lora_A[name], self.lora_B[name])

    @property
    def adapters(self) -> list[str]:
        return list(self.lora_A.keys())

    # ---- blend -----------------------------------------------------------------------------------
    def set_blend(self, weights: Mapping[str, BlendWeight]) -> None:
        """Activate adapters with weights; builds d = w_i * s_i repeated r_i times ([R] or [batch, R])."""
        self.blend = {k: v for k, v in weights.items() if k in self.lora_A}
        d = self.stacked_scale(self.blend) if self.blend else torch.empty(0)
        d = d.to(self.weight.device)
        if d.shape == self.blend_scale.shape and d.device == self.blend_scale.device:
            self.blend_scale.copy_(d)  # in place: a compiled graph or CUDA graph keeps reading it
        else:
            self.blend_scale = d
        scales = {float(w) * self.scaling[n] for n, w in self.blend.items() if not isinstance(w, Tensor)}
        per_row = any(isinstance(w, Tensor) for w in self.blend.values())
        self.uniform_scale = scales.pop() if len(scales) == 1 and not per_row else None
        if self._factors is not None and self.blend:
            self.inference_factors(self._factors[1].dtype)  # refresh in place for captured CUDA graphs

    def inference_factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(A_cat, B_cat * d) in `dtype` for no-grad forwards (B_cat alone when d is per row), cached.

        Rebuilt when an adapter's tensors or the blend change (tracked by their version counters), and written
        into the same storage when the shapes allow, so a CUDA graph captured earlier sees the new values.
        """
        names = tuple(self.blend)
        # read through the registries, not nn.Module.__getattr__: this runs for every layer of every decoded token
        As, Bs = self._modules["lora_A"]._parameters, self._modules["lora_B"]._parameters
        d = self._buffers["blend_scale"]
        # versions catch in-place updates (optimizer steps, load_adapter); data_ptr and device catch replaced
        # storage (`.to(device)`, `p.data = ...`), which does not bump a version counter
        # (and the optimizer step count: fused optimizers update without bumping versions, optimizer_steps.py)
        key = [dtype, names, self._parameters["weight"].device, d._version, d.data_ptr(), optimizer_steps.steps()]
        for n in names:
            A, B = As[n], Bs[n]
            key += (A._version, B._version, A.data_ptr(), B.data_ptr())
        key = tuple(key)
        cache = self._factors
        if cache is not None and cache[0] == key:
            return cache[1], cache[2]
        with torch.no_grad():
            A, B = self.stacked(list(names))
            Ac, Bd = A.to(dtype, copy=True), fold_scale(B, self.blend_scale, dtype)
            if Bd.data_ptr() == B.data_ptr():
                Bd = Bd.clone()  # the cache must never alias a parameter (it is rewritten in place)
            if cache is not None and cache[1].shape == Ac.shape and cache[2].shape == Bd.shape \
                    and cache[1].dtype == dtype and cache[1].device == Ac.device:
                cache[1].copy_(Ac)
                cache[2].copy_(Bd)
                Ac, Bd = cache[1], cache[2]
        self._factors = (key, Ac, Bd)
        return Ac, Bd

    def stacked_scale(self, weights: Mapping[str, BlendWeight]) -> Tensor:
        rows = next((w.shape[0] for w in weights.values() if isinstance(w, Tensor)), None)
        parts = []
        for name, w in weights.items():
            r, s = self.lora_A[name].shape[0], self.scaling[name]
            if isinstance(w, Tensor):
                parts.append((w.detach().double()[:, None] * s).float().expand(rows, r))
            elif rows is not None:
                parts.append(torch.full((rows, r), float(w) * s))
            else:
                parts.append(torch.full((r,), float(w) * s))
        return torch.cat([p.to(self.weight.device) for p in parts], dim=-1)

    def stacked(self, names: list[str]) -> tuple[Tensor, Tensor]:
        """A_cat [R, in], B_cat [out, R] of the named adapters (no copy for one adapter)."""
        if len(names) == 1:
            return self.lora_A[names[0]], self.lora_B[names[0]]
        return (torch.cat([self.lora_A[n] for n in names], 0), torch.cat([self.lora_B[n] for n in names], 1))

    def blend_scales(self) -> list[Tensor]:
        """Per-adapter w_i * s_i (0-d or [batch]) for the reference path."""
        out = []
        for name, w in self.blend.items():
            s = self.scaling[name]
            out.append(w.detach().to(self.weight.device).float() * s if isinstance(w, Tensor)
                       else torch.tensor(float(w) * s, device=self.weight.device))
        return out

    def base_params(self) -> tuple[Tensor, Tensor | None]:
        """(weight, bias), read from the module's registry rather than through nn.Module.__getattr__ (this runs on
        every forward); plain attributes while dynamo traces."""
        if torch.compiler.is_compiling():
            return self.weight, getattr(self, "bias", None)
        params = self._parameters
        return params["weight"], params["bias"] if "bias" in params else getattr(self, "bias", None)

    def use_reference(self, weight: Tensor | None = None, bias: Tensor | None = None) -> bool:
        """The fast path assumes a frozen base (`base_params`, read here unless given) and no dropout in the LoRA
        branch."""
        if weight is None:
            weight, bias = self.base_params()
        frozen = not weight.requires_grad and not (bias is not None and bias.requires_grad)
        no_dropout = not self.training or all(self.dropout_p[n] == 0.0 for n in self.blend)
        return not (frozen and no_dropout)

    def extra_repr(self) -> str:
        ranks = {n: self.lora_A[n].shape[0] for n in self.adapters}
        return f"in={self.in_dim}, out={self.out_dim}, adapters={ranks}, blend={self.blend}, merged={self.merged is not None}"


class LoRALinear(LoRALayer):
    """nn.Linear (weight [out, in]) + adapters: y = x W^T + b + ((x A^T) * d) B^T."""

    layout = "out_in"

    def __init__(self, base: nn.Linear):
        super().__init__(base)
        self.bias = base.bias
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: Tensor) -> Tensor:
        if self.merged is not None or not self.blend:
            return F.linear(x, self.weight, self.bias)
        return _adapted(self, x)


class LoRAConv1D(LoRALayer):
    """transformers Conv1D (weight [in, out], y = x W + b) + adapters: y = x W + b + ((x A^T) * d) B^T."""

    layout = "in_out"

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.bias = base.bias
        self.nf, self.nx = base.nf, getattr(base, "nx", base.weight.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        if self.merged is not None or not self.blend:
            return base_linear(x, self.weight, self.bias, "in_out")
        return _adapted(self, x)


def training_casts(layer: LoRALayer, A: Tensor, B: Tensor, ct: torch.dtype, weight: Tensor, bias: Tensor | None):
    """train_casts.Copies of a layer training one adapter in `ct` on this base (`base_params`), with the cast base
    kept where it needs a cast and `keep_cast_base` allows; None when A is frozen."""
    if not A.requires_grad:
        return None
    kept = layer.keep_cast_base and train_casts.keeps_base(weight, bias, ct)
    return cast_factors(layer, A, B, ct, *((weight, bias, layer.layout) if kept else ()))


def _fused_ops(layer: LoRALayer, copies, weight: Tensor, bias: Tensor | None) -> tuple | None:
    """(W, bias, Ac, Bc, layout) for lora_train_triton: the kept cast base ([out, in], its bias [b; 0]) or a base
    stored in the compute dtype as it is; None when the layer does not take the fused kernels."""
    if not layer.fused_training:
        return None
    if copies.kept is not None:
        _, bias_c, W, Ac, Bc, _ = copies.kept
        return W, bias_c, Ac, Bc, "out_in"
    if weight.dtype == copies.dtype:
        return weight, bias, copies.Ac, copies.Bc, layer.layout
    return None


def _adapted(layer: LoRALayer, x: Tensor) -> Tensor:
    weight, bias = layer.base_params()
    if layer.use_reference(weight, bias):
        names = list(layer.blend)
        return lora_linear_reference(x, layer.weight, layer.bias, layer.layout,
                                     [layer.lora_A[n] for n in names], [layer.lora_B[n] for n in names],
                                     layer.blend_scales(), [layer.dropout_p[n] for n in names], layer.training)
    if torch.compiler.is_compiling():  # plain module attributes for dynamo
        d = layer.blend_scale
        A, B = layer.stacked(list(layer.blend))
        if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad):
            check_rows(x, d)  # training: the form compiled_op.py gives dynamo, on the copies made before tracing
            kept = train_casts.made(layer, A, B, compute_dtype(x))  # (train_casts.prepare), fresh after every step
            return compiled_op.lora_linear(x, layer.weight, layer.bias, A, B, d, layer.layout, layer.uniform_scale,
                                           layer.compiled_form, kept)
        return lora_linear(x, layer.weight, layer.bias, A, B, d, layer.layout, layer.uniform_scale)
    d = layer._buffers["blend_scale"]  # the registry read directly: nn.Module.__getattr__ costs more
    if torch.is_grad_enabled():
        names = list(layer.blend)
        A, B = layer.factor_pair(names[0]) if len(names) == 1 else layer.stacked(names)
        copies = training_casts(layer, A, B, compute_dtype(x), weight, bias) if len(names) == 1 else None
        if copies is not None and layer.uniform_scale is not None:  # the usual case: one adapter, one scale
            ops = _fused_ops(layer, copies, weight, bias)
            if ops is not None and lora_train_triton.applies(x, ops[0], ops[2]):
                return lora_train_triton.fused_lora_linear(x, A, B, ops, layer.uniform_scale)  # four launches
            if copies.kept is not None:
                return kept_lora_linear(x, A, B, copies.kept, layer.uniform_scale)  # fewest torch calls
        return lora_linear(x, weight, bias, A, B, d, layer.layout, layer.uniform_scale,
                           None if copies is None else copies.tensors())
    # no grad, eager: cached cast factors; one fused launch for a few rows (decode), else two small GEMMs
    check_rows(x, d)
    Ac, Bd = layer.inference_factors(compute_dtype(x))
    if d.dim() == 2:  # a mix per row of the batch
        return lora_linear_cached(x, weight, bias, Ac, Bd, d, layer.layout)
    if lora_gemv_triton.applies(x, weight, Ac):
        return lora_gemv_triton.lora_gemv(x, weight, bias, Ac, Bd, layer.layout)
    return lora_linear_cached(x, weight, bias, Ac, Bd, None, layer.layout)


class LoRAEmbedding(LoRALayer):
    """nn.Embedding (weight [num, dim]) + adapters: y = W[idx] + ((A^T)[idx] * d) B^T.

    A [r, num] starts at zero and B [dim, r] Gaussian (as PEFT does for embeddings: A^T is a lookup
    table); no dropout on the LoRA branch of an embedding.
    """

    layout = "in_out"

    def __init__(self, base: nn.Embedding):
        super().__init__(base)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = base.padding_idx, base.max_norm, base.norm_type
        self.scale_grad_by_freq, self.sparse = base.scale_grad_by_freq, base.sparse

    def _init(self, A: Tensor, B: Tensor, rank: int, init: str) -> None:
        nn.init.zeros_(A)
        nn.init.normal_(B, std=1.0 / rank if init == "gaussian" else 1.0)

    def _kw(self) -> dict:
        return dict(padding_idx=self.padding_idx, max_norm=self.max_norm, norm_type=self.norm_type,
                    scale_grad_by_freq=self.scale_grad_by_freq, sparse=self.sparse)

    def forward(self, idx: Tensor) -> Tensor:
        if self.merged is not None or not self.blend:
            return F.embedding(idx, self.weight, **self._kw())
        A, B = self.stacked(list(self.blend))
        return lora_embedding(idx, self.weight, A, B, self.blend_scale, **self._kw())


def lora_class_for(module: nn.Module) -> type[LoRALayer] | None:
    """The wrapper for a base module, or None if this kind of module is not supported."""
    if isinstance(module, nn.Linear):
        return LoRALinear
    if isinstance(module, nn.Embedding):
        return LoRAEmbedding
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return LoRAConv1D  # transformers.pytorch_utils.Conv1D (matched by duck type: no transformers import)
    return None
