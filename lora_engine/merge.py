"""Merge adapters into the base weights in place, and undo it bit for bit.

merge:   W <- round(W + delta)            fp32 accumulate, one rounding, same storage (addmm_-style)
unmerge: W <- round(W_merged - delta) + c  where c corrects the bits the rounding lost

At merge time we already know both W and round(W_merged - delta), so we store their difference as an
integer on the bit patterns: c = bits(W) - bits(round(W_merged - delta)). It is 0 for almost every
element and +-1 at exponent boundaries and ties, so it fits in int8; the rare elements whose difference
does not (a sign change, a large jump in exponent) keep their original value in a small sparse list.
Memory cost: 1 byte per merged base weight element (a snapshot would cost 2 in bf16/fp16, 4 in fp32),
plus the stacked A/B/scales of the merged blend (the delta is recomputed, never stored).

On CUDA the grouped kernels of kernels/merge_triton.py do both passes, from a FusedPlan that is kept between merges
(see `_fused_key`); elsewhere the PyTorch path below.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import torch
from torch import Tensor, nn

from . import optimizer_steps
from .blend import check_weights
from .functional import delta_weight
from .inject import lora_layers
from .kernels import merge_triton
from .layers import LoRALayer

PLAN_ATTR = "_lora_merge_plan"  # on the root module: the last fused merge's FusedPlan, reused while it holds
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
    plan: "FusedPlan | None" = dataclasses.field(default=None, repr=False, compare=False)  # unmerged as a whole

    def nbytes(self) -> int:
        return self.group.nbytes() // len(self.group.weights)


@dataclasses.dataclass(eq=False)
class FusedPlan:
    """A fused merge of one adapter set, kept on the root module between merges (see `_merge_again`).

    Why: at this size the host time of a merge is comparable to its kernel time. On the benchmark GPT (96 layers in
    4 groups) walking the layers, looking up the factors, grouping, snapshotting and building the pointer tables took
    1.2-2.2 ms of host time per merge against 2-5 ms of kernels; with the plan kept, merging the same unchanged
    adapters again is a key check, one launch per group, one host sync and the records."""

    factors: tuple  # `_factors_key(layers, weights)` when it was built; with `target` equal, the plan still holds
    entries: list[tuple[str, LoRALayer]]  # (path, layer) of every merged layer, in lora_layers() order
    layers: list[LoRALayer]  # the layers of `entries`, kept as a list: every merge walks it for the key
    ptrs: list[int]  # each layer's weight storage, where the kernels write
    blend: tuple  # `_blend_key(layers, weights)` when it was built: the blend, the tiles, the optimizer step count
    members: list[list[LoRALayer]]  # per group, its layers by slot
    writes: list[tuple]  # per group, `_weights_key(members)` when it was built: where its kernels write
    groups: list["merge_triton.Group"]
    paths: list[list[str]]  # per group, its layers' paths by slot (to name the layers a refusal is about)
    records: list[FusedMergeRecord]  # per layer, what merge() sets as layer.merged
    counts: Tensor  # every group's counts in one buffer (merge_triton.shared_counts): one read per merge; zeroed
    # whenever the plan is left unmerged (`_restore`), so that a merge launches nothing before its kernels
    held: list  # the factors and their storages named in `factors`: their ids and pointers stay unique while held
    merged: bool = False


def _bits(t: Tensor) -> Tensor:
    return t.view(_BITS[t.dtype]).to(torch.int64)


def _mixes(layers: Mapping[str, LoRALayer], weights: Mapping[str, float] | None) -> list[tuple[str, LoRALayer, dict]]:
    """(path, layer, {adapter: weight}) of every layer with something to merge."""
    mixes = []
    for path, layer in layers.items():
        if weights is None:
            if any(isinstance(w, Tensor) for w in layer.blend.values()):
                raise ValueError("the active blend has per-row tensor weights, which cannot be merged: "
                                 "pass merge(model, {adapter: float, ...})")
            mix = dict(layer.blend)
        else:  # the registry read directly: nn.Module.__getattr__ costs more than the lookup
            adapters = layer._modules["lora_A"]._parameters
            mix = {n: float(w) for n, w in weights.items() if n in adapters}
        if mix:
            mixes.append((path, layer, mix))
    return mixes


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

    Forward then runs the base path alone. `unmerge(model)` restores the original bits exactly. On CUDA, merging
    the same unchanged adapters as the last merge of `model` reuses that merge's plan (FusedPlan).
    """
    if weights is not None:
        weights = dict(weights)
    kept = model.__dict__.get(PLAN_ATTR)
    if kept is not None and _merge_again(model, kept, weights):
        return [path for path, _ in kept.entries]
    layers = lora_layers(model)
    if any(layer.merged is not None for layer in layers.values()):
        raise RuntimeError("the model is already merged: call unmerge(model) first")
    if weights is not None:
        check_weights(model, weights, allow_rows=False, layers=layers)
    mixes = _mixes(layers, weights)
    if not mixes:
        raise ValueError("nothing to merge: no adapter is active and no weights were given")
    factors = _factors(mixes)
    if kept is not None and not kept.merged:
        del model.__dict__[PLAN_ATTR], kept  # stale: its snapshot goes before a new one is taken
    if _fused_applies(mixes, factors):
        plan = model.__dict__[PLAN_ATTR] = _plan_and_launch(mixes, factors, weights)
        _complete(plan)
        return [path for path, _, _ in mixes]
    stacks = [_stacked(layer, mix) for _, layer, mix in mixes]
    _refuse_non_finite(mixes, stacks)
    for (_, layer, mix), (A, B, d) in zip(mixes, stacks):
        layer.merged = _merge_layer(layer, mix, A, B, d)
    return [path for path, _, _ in mixes]


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


# ---- the fused path: a plan built once, then reused while its key holds ----------------------------------------

def _fused_key(layers: list[LoRALayer], weights: dict | None) -> tuple | None:
    """Everything a FusedPlan of `layers` depends on, read cheaply (no tensor is made, no host sync): its
    `_target_key` (what its launch needs to be safe) and its `_factors_key` (what its snapshot was taken from).
    None: a weight that is not a plain float/int (e.g. a per-row tensor), or a merged layer: merge() plans afresh."""
    target = _target_key(layers, weights)
    factors = None if target is None else _factors_key(layers, weights)
    return None if factors is None else target + factors


def _target_key(layers: list[LoRALayer], weights: dict | None) -> tuple | None:
    """What a kept plan's launches depend on for being right in the usual case (`_blend_key`) and for their safety
    (`_weights_key`). None: a blend weight that is not a plain float/int (no plan is kept for those)."""
    blend = _blend_key(layers, weights)
    return None if blend is None else blend + _weights_key(layers)


def _blend_key(layers: list[LoRALayer], weights: dict | None) -> tuple | None:
    """The blend asked for, the tiles and the optimizer step count (a fused optimizer changes factors without bumping
    versions, optimizer_steps.py). None: a blend weight that is not a plain float/int."""
    pairs = weights.items() if weights is not None else [kv for layer in layers for kv in layer.blend.items()]
    if not all(type(w) is float or type(w) is int for _, w in pairs):
        return None
    blend = tuple(weights.items()) if weights is not None else tuple(tuple(l.blend.items()) for l in layers)
    return tuple(merge_triton.CONFIG.items()), blend, optimizer_steps.steps()


def _weights_key(layers: list[LoRALayer]) -> tuple:
    """Every weight's pointer, dtype, shape and contiguity: the pointer tables address M x N elements there."""
    key = []
    for layer in layers:
        W = layer._parameters["weight"]  # registries read directly: nn.Module.__getattr__ would cost more
        key.append((W.data_ptr(), W.dtype, W.shape, W.is_contiguous()))
    return tuple(key)


def _factors_key(layers: list[LoRALayer], weights: dict | None) -> tuple | None:
    """Per layer (None if it is merged), per adapter of its mix: name and scale (the S table), and each factor's id,
    version counter (bumped by an in-place write such as load_adapter's copy_) and data pointer (changed by
    `p.data = ...`). The plan holds every tensor and storage it read (its groups the weights', `held` the factors'),
    so no other tensor can take their ids or pointers while it lives. Not seen, as in layers.inference_factors and
    train_casts: other writes that bypass the version counter (`p.data.add_` outside an optimizer step, a kernel
    writing through a raw pointer)."""
    key = []
    for layer in layers:
        if layer.merged is not None:
            return None
        As, Bs, scaling = layer._modules["lora_A"]._parameters, layer._modules["lora_B"]._parameters, layer.scaling
        run = []
        for n in (layer.blend if weights is None else weights):
            A = As.get(n)
            if A is not None:
                B = Bs[n]
                run += (n, scaling[n], id(A), A._version, A.data_ptr(), id(B), B._version, B.data_ptr())
        key.append(tuple(run))
    return tuple(key)


def _plan_and_launch(mixes, factors, weights: dict | None) -> FusedPlan:
    """Group same-shape layers; per group snapshot its factors, build its pointer tables and launch its merge (the
    GPU merges a group while the next one is built)."""
    layers = [layer for _, layer, _ in mixes]
    groups: dict[tuple, list[int]] = {}
    for i, (layer, per) in enumerate(zip(layers, factors)):
        W = layer.weight
        gkey = (W.dtype, layer.layout, tuple(W.shape), tuple(A.shape[0] for A, _, _ in per))
        groups.setdefault(gkey, []).append(i)
    counts, views = merge_triton.shared_counts([len(m) for m in groups.values()], layers[0].weight.device)
    built, records = [], [None] * len(layers)
    for (gkey, members), view in zip(groups.items(), views):
        g = merge_triton.build_group([layers[i].weight.detach() for i in members], gkey[1],
                                     [factors[i] for i in members], counts=view)
        merge_triton.launch_merge(g, counts_zeroed=True)  # shared_counts starts at zero
        built.append(g)
        for slot, i in enumerate(members):
            records[i] = FusedMergeRecord(weights=mixes[i][2], group=g, slot=slot)
    # read while the GPU merges: a launch moves no version, pointer or record
    group_layers = [[layers[i] for i in m] for m in groups.values()]
    held = [x for per in factors for A, B, _ in per for t in (A, B) for x in (t, t.untyped_storage())]
    plan = FusedPlan(factors=_factors_key(layers, weights), entries=[(path, layer) for path, layer, _ in mixes],
                     layers=layers, ptrs=[layer.weight.data_ptr() for layer in layers],
                     blend=_blend_key(layers, weights), members=group_layers,
                     writes=[_weights_key(m) for m in group_layers], groups=built,
                     paths=[[mixes[i][0] for i in m] for m in groups.values()], records=records, counts=counts,
                     held=held)
    for rec in records:
        rec.plan = plan
    return plan


def _merge_again(model: nn.Module, plan: FusedPlan, weights: dict | None) -> bool:
    """Merge with a kept plan if nothing it was built from changed; False (nothing left written) if it is stale.

    Before a group's launch only what makes it safe and likely right is checked (`_blend_key`: the blend, the tiles
    and the optimizer step count; `_weights_key` of its layers: where its kernels write), so the GPU merges the first
    group while the next is checked; the rest of the key (each factor's id, version and storage) and the walk of the
    model, which finds layers added, removed, replaced or merged through another module, run while the GPU merges
    (measured: the host time before the first launch was ~30% of a merge's time above its kernels, NOTES (21)), and
    a merge found stale then is undone exactly.
    """
    blend = _blend_key(plan.layers, weights)
    if plan.merged or blend is None or blend != plan.blend:
        return False
    launched = _launch(plan)
    if launched < len(plan.groups) or _factors_key(plan.layers, weights) != plan.factors \
            or not _same_layers(model, plan, weights):
        merge_triton.finish(plan.groups[:launched], plan.counts)  # the overflow totals the undo needs
        _restore(plan, plan.groups[:launched])
        return False
    _complete(plan)
    return True


def _same_layers(model: nn.Module, plan: FusedPlan, weights: dict | None) -> bool:
    """Whether merge() would plan the same layers now: the same paths and modules, none of them merged."""
    layers = lora_layers(model)
    if any(layer.merged is not None for layer in layers.values()):
        return False
    try:
        return [(path, layer) for path, layer, _ in _mixes(layers, weights)] == plan.entries
    except ValueError:  # a per-row blend appeared: merge() plans afresh and refuses it
        return False


def _launch(plan: FusedPlan) -> int:
    """Launch the groups in order, each once its weights are where the plan writes; returns how many were launched
    (all of them unless a weight moved: the caller undoes those). The counts are zero already (`_restore`)."""
    for i, (g, members, writes) in enumerate(zip(plan.groups, plan.members, plan.writes)):
        if _weights_key(members) != writes:
            return i
        merge_triton.launch_merge(g, counts_zeroed=True)
    return len(plan.groups)


def _complete(plan: FusedPlan) -> None:
    """The one host sync of a merge, then: refuse (the launch is undone exactly), or redo a group whose overflow list
    ran out of slots (rare) at the exact size, or set the layers' records.

    A non-finite W' is never written (the kernel leaves that element and marks it), so a refusal is an exact unmerge
    of what was written."""
    found = merge_triton.finish(plan.groups, plan.counts)
    bad = [path for paths, (non_finite, _) in zip(plan.paths, found) for path, n in zip(paths, non_finite) if n]
    if bad:
        _restore(plan)
        _refuse(bad, plan.groups[0].weights[0].dtype)
    short = [(g, asked) for g, (_, asked) in zip(plan.groups, found) if asked > g.capacity]
    for g, asked in short:
        merge_triton.restore(g)
        merge_triton.launch_merge(g, capacity=asked)
    if short:
        merge_triton.finish(plan.groups, plan.counts)
    for layer, rec in zip(plan.layers, plan.records):
        _set_merged(layer, rec)
    plan.merged = True


def _restore(plan: FusedPlan, groups: list | None = None) -> None:
    """Undo the plan's merge (of `groups` alone: those launched) and zero its counts for the next launch."""
    for g in plan.groups if groups is None else groups:
        merge_triton.restore(g)
    plan.counts.zero_()


def _set_merged(layer: LoRALayer, rec) -> None:
    """layer.merged = rec, without nn.Module.__setattr__'s registry checks (`merged` is a plain attribute; this
    runs for every layer of every fused merge and unmerge)."""
    object.__setattr__(layer, "merged", rec)


def _unmerge_fused(plan: FusedPlan) -> list[LoRALayer]:
    """Undo a fused merge as a whole (its groups span the model): one launch per group; returns its layers."""
    if plan.merged:
        if any(layer._parameters["weight"].data_ptr() != ptr for layer, ptr in zip(plan.layers, plan.ptrs)):
            _follow_moved_weights(plan)
        _restore(plan)
        plan.merged = False
    for layer, rec in zip(plan.layers, plan.records):
        if layer.merged is rec:
            _set_merged(layer, None)
    return plan.layers


def _follow_moved_weights(plan: FusedPlan) -> None:
    """Point the groups at the weights as they are now: the model was moved since the merge and brought back (new
    storage, the merged values), e.g. model.cpu().cuda(). Checked for every layer before anything is restored."""
    now = {id(g): list(g.weights) for g in plan.groups}
    for (path, layer), rec in zip(plan.entries, plan.records):
        W, was = layer.weight.detach(), rec.group.weights[rec.slot]
        _on_cuda_or_refuse(layer)
        if (W.device, W.dtype, W.shape) != (was.device, was.dtype, was.shape) or not W.is_contiguous():
            raise RuntimeError(f"the base weight of {path} is not where the fused merge can restore it: it is "
                               f"{W.dtype} {tuple(W.shape)} on {W.device} now, was {was.dtype} {tuple(was.shape)} on "
                               f"{was.device} when merged. Move or cast the model back first (or unmerge before "
                               "moving or casting a merged model)")
        now[id(rec.group)][rec.slot] = W
    for g in plan.groups:
        merge_triton.repoint(g, now[id(g)])
    plan.ptrs = [layer.weight.data_ptr() for layer in plan.layers]


@torch.no_grad()
def unmerge(model: nn.Module) -> list[str]:
    """Take every merged delta back out, restoring the base weights bit for bit; returns the paths.

    A fused merge is undone as a whole: unmerging a submodule of a model merged on CUDA unmerges all of it."""
    undone: set[int] = set()  # id() of the layers unmerged here
    kept = model.__dict__.get(PLAN_ATTR)
    if kept is not None and kept.merged:  # launched first: the walk below runs while the GPU restores
        undone.update(map(id, _unmerge_fused(kept)))
    done = []
    for path, layer in lora_layers(model).items():
        rec = layer.merged
        if isinstance(rec, FusedMergeRecord):  # merged through another module (e.g. the root of a submodule)
            undone.update(map(id, _unmerge_fused(rec.plan)))
        elif rec is not None:
            _unmerge_layer(layer, rec)
            undone.add(id(layer))
        if id(layer) in undone:
            done.append(path)
    return done


def _unmerge_layer(layer: LoRALayer, rec: MergeRecord) -> None:
    W = layer.weight.detach()
    back = (W.float() - delta_weight(rec.A, rec.B, rec.d, layer.layout)).to(W.dtype)
    bits = _bits(back) + rec.correction.to(torch.int64)
    restored = bits.to(_BITS[W.dtype]).view(W.dtype)
    restored.view(-1)[rec.overflow_index] = rec.overflow_value
    W.copy_(restored)
    layer.merged = None


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
