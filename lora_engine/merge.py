"""Merge adapters into the base weights in place, and undo it bit for bit.

merge:   W <- round(W + delta)            fp32 accumulate, one rounding, same storage (addmm_-style)
unmerge: W <- round(W_merged - delta) + c  where c corrects the bits the rounding lost

At merge time we already know both W and round(W_merged - delta), so we store their difference as an
integer on the bit patterns: c = bits(W) - bits(round(W_merged - delta)). It is 0 for almost every
element and +-1 at exponent boundaries and ties, so it fits in int8; the rare elements whose difference
does not (a sign change, a large jump in exponent) keep their original value in a small sparse list.
Memory cost: 1 byte per merged base weight element (a snapshot would cost 2 in bf16/fp16, 4 in fp32),
plus the stacked A/B/scales of the merged blend (the delta is recomputed, never stored).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import torch
from torch import Tensor, nn

from .blend import check_weights
from .functional import delta_weight
from .inject import lora_layers
from .kernels import merge_triton
from .layers import LoRALayer

GROUP_CACHE_ATTR = "_lora_merge_groups"  # on the root module: the fused merge's prepared groups, for reuse
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
         torch.float64: torch.int64}


@dataclasses.dataclass
class MergeRecord:
    """What a layer needs to undo its merge exactly."""

    weights: dict[str, float]
    A: Tensor  # [R, in] stacked, as merged
    B: Tensor  # [out, R]
    d: Tensor  # [R] fp32
    correction: Tensor  # int8, the weight's shape
    overflow_index: Tensor  # flat indices whose correction did not fit int8
    overflow_value: Tensor  # their original values

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.A, self.B, self.d, self.correction, self.overflow_index, self.overflow_value))


@dataclasses.dataclass
class FusedMergeRecord:
    """A layer merged by the grouped CUDA kernels (kernels/merge_triton.py): the group holds the factor
    snapshot, the int8 corrections and the overflow list of all its layers; `slot` is this layer's index."""

    weights: dict[str, float]
    group: "merge_triton.Group"
    slot: int

    def nbytes(self) -> int:
        return self.group.nbytes() // len(self.group.weights)


def _bits(t: Tensor) -> Tensor:
    return t.view(_BITS[t.dtype]).to(torch.int64)


def _plan(layers: Mapping[str, LoRALayer], weights: Mapping[str, float] | None) -> list[tuple[str, LoRALayer, dict]]:
    plan = []
    for path, layer in layers.items():
        if weights is None:
            if any(isinstance(w, Tensor) for w in layer.blend.values()):
                raise ValueError("the active blend has per-row tensor weights, which cannot be merged: "
                                 "pass merge(model, {adapter: float, ...})")
            mix = dict(layer.blend)
        else:
            mix = {n: float(w) for n, w in weights.items() if n in layer.lora_A}
        if mix:
            plan.append((path, layer, mix))
    return plan


def _stacked(layer: LoRALayer, mix: dict[str, float]) -> tuple[Tensor, Tensor, Tensor]:
    A, B = layer.stacked(list(mix))
    return A.detach().clone(), B.detach().clone(), layer.stacked_scale(mix).float()


def _refuse_non_finite(plan, stacks) -> None:
    """Refuse before anything is written: every delta finite and W + delta within the dtype's range.

    |W + delta| <= max|W| + sum_k |d_k| max|B[:, k]| max|A[k, :]|, so a finite bound below the dtype's
    maximum proves no element can become NaN/inf (one host sync for the whole model).
    """
    bounds = []
    for (_, layer, _), (A, B, d) in zip(plan, stacks):
        w = layer.weight.detach()
        lora = (d.abs() * B.abs().amax(0).float() * A.abs().amax(1).float()).sum()
        bounds.append(w.abs().amax().float() + lora)
    if not bounds:
        return
    bounds = torch.stack([b.cpu() for b in bounds]).tolist()
    bad = [path for (path, layer, _), b in zip(plan, bounds)
           if not (b == b and b <= torch.finfo(layer.weight.dtype).max)]
    _refuse(bad, plan[0][1].weight.dtype)


def _refuse(bad: list[str], dtype: torch.dtype) -> None:
    if bad:
        raise ValueError(f"refusing to merge: the delta of {len(bad)} module(s) is NaN/inf or would overflow "
                         f"{dtype}: {bad[:8]}{' ...' if len(bad) > 8 else ''}. "
                         "The adapter holds non-finite or huge values; nothing was written.")


@torch.no_grad()
def merge(model: nn.Module, weights: Mapping[str, float] | None = None) -> list[str]:
    """Add the blend (default: the active one) into the base weights in place; returns merged paths.

    Forward then runs the base path alone. `unmerge(model)` restores the original bits exactly.
    """
    layers = lora_layers(model)
    if any(layer.merged is not None for layer in layers.values()):
        raise RuntimeError("the model is already merged: call unmerge(model) first")
    if weights is not None:
        weights = dict(weights)
        check_weights(model, weights, allow_rows=False, layers=layers)
    plan = _plan(layers, weights)
    if not plan:
        raise ValueError("nothing to merge: no adapter is active and no weights were given")
    factors = _factors(plan)
    if _fused_applies(plan, factors):
        _merge_fused(plan, factors, model.__dict__.setdefault(GROUP_CACHE_ATTR, {}))
        return [path for path, _, _ in plan]
    stacks = [_stacked(layer, mix) for _, layer, mix in plan]
    _refuse_non_finite(plan, stacks)
    for (_, layer, mix), (A, B, d) in zip(plan, stacks):
        layer.merged = _merge_layer(layer, mix, A, B, d)
    return [path for path, _, _ in plan]


def _factors(plan) -> list[list[tuple[Tensor, Tensor, float]]]:
    """Per planned layer: (A_a, B_a, w_a * s_a) for each adapter of its mix (each parameter looked up once)."""
    return [[(*layer.factor_pair(n), w * layer.scaling[n]) for n, w in mix.items()] for _, layer, mix in plan]


def _fused_applies(plan, factors) -> bool:
    """CUDA weights, fp32 factors and one rank per layer's mix: the grouped kernels take it."""
    if merge_triton.triton is None:
        return False
    same_rank = all(len({A.shape[0] for A, _, _ in per}) == 1 for per in factors)
    tensors = [t for per in factors for A, B, _ in per for t in (A, B)]
    return same_rank and merge_triton.available([layer.weight for _, layer, _ in plan], tensors)


def _merge_fused(plan, factors, cache: dict) -> None:
    """Group same-shape layers and merge each group in one pass; one host sync reads what the pass found.

    A non-finite W' is never written (the kernel leaves that element and marks it), so a refusal is an exact
    unmerge of what was written; an overflow list that ran out of slots (rare) is redone with the exact size.
    `cache` keeps each group's factor snapshot and pointer tables for the next merge of the same, unchanged
    adapters (merge_triton.prepare checks every tensor's identity, storage and version).
    """
    groups: dict[tuple, list] = {}
    for entry, per in zip(plan, factors):
        W = entry[1].weight
        key = (W.dtype, entry[1].layout, tuple(W.shape), tuple(A.shape[0] for A, _, _ in per))
        groups.setdefault(key, []).append((entry, per))
    built = []
    for key, members in groups.items():
        weights = [entry[1].weight.detach() for entry, _ in members]
        g = merge_triton.prepare(cache.get(key), weights, key[1], [per for _, per in members])
        cache[key] = g
        merge_triton.launch_merge(g)
        built.append((g, [entry for entry, _ in members]))
    for key in [k for k in cache if k not in groups]:
        del cache[key]  # only the last merge's groups are kept
    found = merge_triton.finish([g for g, _ in built])  # the one host sync of a merge
    bad = [path for (g, members), (non_finite, _) in zip(built, found)
           for (path, _, _), n in zip(members, non_finite) if n]
    if bad:
        for g, _ in built:
            merge_triton.restore(g)
        _refuse(bad, plan[0][1].weight.dtype)
    short = [(g, asked) for (g, _), (_, asked) in zip(built, found) if asked > g.ov_total]
    for g, asked in short:  # the overflow list was too small: undo this group exactly, redo with the exact size
        merge_triton.restore(g)
        merge_triton.launch_merge(g, capacity=asked)
    if short:
        merge_triton.finish([g for g, _ in short])
    for g, members in built:
        for slot, (_, layer, mix) in enumerate(members):
            layer.merged = FusedMergeRecord(weights=mix, group=g, slot=slot)


def _merge_layer(layer: LoRALayer, mix: dict[str, float], A: Tensor, B: Tensor, d: Tensor) -> MergeRecord:
    W = layer.weight.detach()
    delta = delta_weight(A, B, d, layer.layout)
    original = W.clone()
    W.copy_(W.float() + delta)  # one rounding, into the same storage
    back = (W.float() - delta).to(W.dtype)
    diff = _bits(original) - _bits(back)
    fits = diff.abs() <= 127
    overflow = (~fits).flatten().nonzero().flatten()
    return MergeRecord(weights=mix, A=A, B=B, d=d, correction=torch.where(fits, diff, 0).to(torch.int8),
                       overflow_index=overflow, overflow_value=original.flatten()[overflow].clone())


@torch.no_grad()
def unmerge(model: nn.Module) -> list[str]:
    """Take every merged delta back out, restoring the base weights bit for bit; returns the paths."""
    done, restored_groups = [], set()
    for path, layer in lora_layers(model).items():
        rec = layer.merged
        if rec is None:
            continue
        if isinstance(rec, FusedMergeRecord):
            if id(rec.group) not in restored_groups:  # one launch restores every layer of the group
                _on_cuda_or_refuse(layer)
                merge_triton.restore(rec.group)
                restored_groups.add(id(rec.group))
            layer.merged = None
            done.append(path)
            continue
        W = layer.weight.detach()
        back = (W.float() - delta_weight(rec.A, rec.B, rec.d, layer.layout)).to(W.dtype)
        bits = _bits(back) + rec.correction.to(torch.int64)
        restored = bits.to(_BITS[W.dtype]).view(W.dtype)
        restored.view(-1)[rec.overflow_index] = rec.overflow_value
        W.copy_(restored)
        layer.merged = None
        done.append(path)
    return done


def merge_memory_bytes(model: nn.Module) -> int:
    """Bytes currently held to make unmerge exact (see the module docstring for the breakdown)."""
    return sum(layer.merged.nbytes() for layer in lora_layers(model).values() if layer.merged is not None)


@torch.no_grad()
def base_weight(layer: LoRALayer) -> Tensor:
    """The layer's base weight without its merged delta, leaving the model unchanged.

    Not merged: the weight itself (no copy). Merged: a restored copy, bit for bit what unmerge() would
    write back (same math), e.g. to fingerprint the base of a merged model.
    """
    W = layer.weight.detach()
    rec = layer.merged
    if rec is None:
        return W
    if isinstance(rec, FusedMergeRecord):
        _on_cuda_or_refuse(layer)
        out = torch.empty_like(W)
        merge_triton.restore(rec.group, out=[out], only=rec.slot)
        return out
    back = (W.float() - delta_weight(rec.A, rec.B, rec.d, layer.layout)).to(W.dtype)
    restored = (_bits(back) + rec.correction.to(torch.int64)).to(_BITS[W.dtype]).view(W.dtype)
    restored.view(-1)[rec.overflow_index] = rec.overflow_value
    return restored


def _on_cuda_or_refuse(layer: LoRALayer) -> None:
    if not layer.weight.is_cuda:
        raise RuntimeError("this model was merged on the GPU by the fused kernels and has since been moved: "
                           "move it back to CUDA to unmerge exactly (or unmerge before moving it)")
