"""The fused merge/unmerge kernels, run on CPU through Triton's interpreter (TRITON_INTERPRET=1).

The interpreter executes the same kernel source with numpy, so CI (no GPU) proves the arithmetic and the
bookkeeping: the merge pass counts, bit-exact restore (overflow list included), per-layer restore into a
separate buffer, both weight layouts, 16- and 32-bit dtypes, and the same W' bit for bit whatever the tiles (merge
and unmerge on different ones). The GPU run
(`benchmarks/run_all.py --check`) proves the compiled kernels with lora_engine.kernels.selfcheck.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = r'''
import sys
import torch
from lora_engine.kernels import merge_triton as mt
assert mt.triton is not None, "triton is not importable"
torch.manual_seed(int(sys.argv[1]))
dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[sys.argv[2]]
layout = sys.argv[3]
M, N, R, L, NA = 40, 70, 4, 3, 2
Ws = [(torch.randn(M, N) * 0.02).to(dtype) for _ in range(L)]
for W in Ws:
    W[:2] = 0.0          # zero weights: their corrections overflow int8 and go to the overflow list
    W[2, :5] = -1e-30 if dtype == torch.float32 else 0.0
orig = [w.clone() for w in Ws]
fac = [[((torch.randn(R, N if layout == "out_in" else M) * 0.1), torch.randn(M if layout == "out_in" else N, R) * 0.1,
         0.5 + a) for a in range(NA)] for _ in range(L)]
g = mt.build_group(Ws, layout, fac)
mt.launch_merge(g, capacity=3)  # too few overflow slots: the elements without one are left unchanged
(non_finite, asked), = mt.finish([g])
assert sum(non_finite) == 0 and asked > 3 and g.ov_total == 3, (non_finite, asked, g.ov_total)
left = sum(int((w == o).sum()) for w, o in zip(Ws, orig))
mt.restore(g)
assert all(torch.equal(w.view(torch.uint8), o.view(torch.uint8)) for w, o in zip(Ws, orig)), "short list: restore"
mt.launch_merge(g, capacity=asked)
(non_finite, asked2), = mt.finish([g])
assert asked2 == asked == g.ov_total and sum(int((w == o).sum()) for w, o in zip(Ws, orig)) < left
eps = torch.finfo(dtype).eps
for l in range(L):
    delta = sum(s * (B @ A if layout == "out_in" else A.t() @ B.t()) for A, B, s in fac[l])
    want = (orig[l].float() + delta).to(dtype).float()
    err = ((Ws[l].float() - want).abs() / (want.abs() + delta.abs().max())).max().item()
    assert err <= 4 * eps, f"merged layer {l} off by {err / eps:.2f} eps"
# other tiles write the same W' bit for bit: delta is the same FMA sequence per element whatever the tile
others = [o.clone() for o in orig]
g1 = mt.build_group(others, layout, fac)
g1.config.update(BLOCK_M=8, BLOCK_N=16, num_warps=2, TILES=3)  # 3 tiles per program: the last one's rows partly out
mt.launch_merge(g1, capacity=asked)
assert mt.finish([g1]) == [([0] * L, asked)]
assert all(torch.equal(w.view(torch.uint8), o.view(torch.uint8)) for w, o in zip(Ws, others)), "tiles differ"
mt.restore(g1)
assert all(torch.equal(w.view(torch.uint8), o.view(torch.uint8)) for w, o in zip(others, orig)), "other tiles"
g.config = dict(mt.CONFIG, U_BLOCK_M=16, U_BLOCK_N=32)  # delta does not depend on the tiles: unmerge on others
out = [torch.empty_like(Ws[1])]
mt.restore(g, out=out, only=1)
assert torch.equal(out[0], orig[1]) and not torch.equal(Ws[1], orig[1]), "per-layer restore"
mt.restore(g)
assert all(torch.equal(w.view(torch.uint8), o.view(torch.uint8)) for w, o in zip(Ws, orig)), "restore not bit-exact"
for cycle in range(3):  # cycles with the kept buffers: merge on the configured tiles or 16x32, restore on 8x64
    g.config = dict(mt.CONFIG, BLOCK_M=16, BLOCK_N=32) if cycle % 2 else dict(mt.CONFIG)
    mt.launch_merge(g)
    assert mt.finish([g]) == [([0] * L, asked)] and g.ov_total == asked
    g.config = dict(mt.CONFIG, U_BLOCK_M=8, U_BLOCK_N=64, U_num_warps=2)
    mt.restore(g)
    assert all(torch.equal(w.view(torch.uint8), o.view(torch.uint8)) for w, o in zip(Ws, orig)), f"cycle {cycle}"
bad = [[(A, B.clone().fill_(float("nan")) if l == 1 else B, s) for A, B, s in per] for l, per in enumerate(fac)]
g2 = mt.build_group(Ws, layout, bad)
mt.launch_merge(g2)
(non_finite, _), = mt.finish([g2])
assert non_finite[1] == M * N and non_finite[0] == non_finite[2] == 0, non_finite
assert torch.equal(Ws[1], orig[1]) and not torch.equal(Ws[0], orig[0]), "a non-finite element was written"
mt.restore(g2)
assert all(torch.equal(w.view(torch.uint8), o.view(torch.uint8)) for w, o in zip(Ws, orig)), "refusal: restore"
print("ok")
'''


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_fused_merge_kernels_exact_in_triton_interpreter(dtype, layout):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", SCRIPT, "3", dtype, layout], env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


MERGE_PY = r'''
import sys
import numpy as np
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from lora_engine import LoRASpec, inject_lora, lora_layers, merge, set_blend, unmerge
from lora_engine.kernels import merge_triton as mt
mm = sys.modules["lora_engine.merge"]
mt.available = lambda weights, factors: True  # CPU tensors stand in for CUDA ones: the interpreter runs the kernels
mt.CONFIG.update(BLOCK_M=8, BLOCK_N=64, num_warps=4)  # the interpreter runs one program at a time: fewer, larger
torch.manual_seed(0)  # tiles here (the kernels' results do not depend on the tiles: the test above)
model = nn.Module()
model.blk = nn.Module()
model.blk.a, model.blk.b, model.c = nn.Linear(24, 40), nn.Linear(24, 40), Conv1D(48, 24)
model.to(torch.bfloat16)
with torch.no_grad():
    model.blk.a.weight[:2] = 0.0  # zero weights: corrections that overflow int8 (the overflow list)
for name in ("v0", "v1"):
    inject_lora(model, LoRASpec(["blk.a", "blk.b", "c"], rank=4, alpha=8), name)
with torch.no_grad():
    for layer in lora_layers(model).values():
        for p in [*layer.lora_A.values(), *layer.lora_B.values()]:
            p.normal_(0, 0.3)
layers = lora_layers(model)
orig = {k: l.weight.detach().clone() for k, l in layers.items()}
EPS = torch.finfo(torch.bfloat16).eps


def check(mix, paths=None):
    # every merged weight one rounding of the float64 sum (within 1 eps), every other one untouched
    for k, l in layers.items():
        if paths is not None and k not in paths:
            assert torch.equal(l.weight.view(torch.int16), orig[k].view(torch.int16)), f"{k} written"
            continue
        d = sum(w * l.scaling[n] * (l.lora_B[n].double() @ l.lora_A[n].double()) for n, w in mix.items())
        d = d if l.layout == "out_in" else d.t()
        want = orig[k].double() + d
        err = ((l.weight.double() - want).abs() / (want.abs() + d.abs().max())).max().item()
        assert err <= EPS, f"{k}: merged off by {err / EPS:.2f} eps from the float64 reference of {mix}"


def exact():
    return all(torch.equal(l.weight.view(torch.int16), orig[k].view(torch.int16)) and l.merged is None
               for k, l in layers.items())


def refused(mix, path):
    # merge() refuses, naming the one module at fault, and every weight is as it was, bit for bit
    try:
        merge(model, mix)
    except ValueError as e:
        assert f"['{path}']" in str(e) and "nothing was written" in str(e), e
    else:
        raise AssertionError(f"{mix} was merged")
    assert exact()


def cycle(mix, paths=None):
    # merge, check against float64, unmerge, check bit-exact; returns the plan the merge used
    assert merge(model, mix) == (paths or list(layers))
    check(mix, paths)
    plan = model.__dict__[mm.PLAN_ATTR]
    assert unmerge(model) == (paths or list(layers)) and exact(), "unmerge not bit-exact"
    return plan


mix = {"v0": 0.7, "v1": -0.4}
first = cycle(mix)
assert len(first.groups) == 2  # blk.a and blk.b share one group (same shape), c has its own
assert cycle(mix) is first  # the same unchanged adapters: the plan is reused, records included
merge(model, mix)
assert all(l.merged is rec for l, rec in zip(first.layers, first.records))
assert sum(g.ov_total for g in first.groups) > 0, "no overflow entries: the test does not reach the overflow list"
unmerge(model)
assert exact()

for _ in range(100):  # a kept plan, many cycles: still bit-exact (the overflow list's buffers and counts reused)
    merge(model, mix)
    unmerge(model)
assert exact() and model.__dict__[mm.PLAN_ATTR] is first

with torch.no_grad():  # an optimizer-style in-place step: the version counter moves, the plan is rebuilt
    layers["blk.a"].lora_B["v0"].add_(0.5)
second = cycle(mix)
assert second is not first and cycle(mix) is second
with torch.no_grad():  # replaced storage (no version bump): caught by the data pointer
    layers["c"].lora_A["v1"].data = torch.randn(4, 24) * 0.3
third = cycle(mix)
assert third is not second
assert cycle({"v0": 0.7, "v1": 0.9}) is not third  # new blend weights: new scales
layers["blk.b"].scaling["v1"] = 5.0  # a new adapter scale
cycle({"v0": 0.7, "v1": 0.9})
for blend in ({"v0": 0.25, "v1": 1.5}, {"v0": 0.5, "v1": 1.5}, {"v0": -1.0}):  # the active blend (no weights)
    set_blend(model, blend)
    assert merge(model) == list(layers)
    check(blend)
    unmerge(model)
    assert exact()

# Weights merge() refuses are refused with a plan kept for their valid look-alike, before anything is written
kept = cycle({"v0": 0.7})
for bad, error in (({"v0": 0.7, "ghost": 1.0}, KeyError), ({"v0": torch.tensor(0.7)}, ValueError),
                   ({"v0": True}, ValueError), ({"v0": float("nan")}, ValueError)):
    try:
        merge(model, bad)
        raise AssertionError(f"merged {bad}")
    except error:
        assert exact()
assert cycle({"v0": 0.7}) is kept
cycle({"v0": np.float64(0.7)})  # a float subclass: not keyed, planned afresh every time
cycle({"v0": np.float64(-0.9)})

# The short overflow list: redone at the exact size, and the kept plan's next merge not short again
default_capacity, launch_merge, launches = mt.default_capacity, mt.launch_merge, []
mt.default_capacity = lambda g: 1
mt.launch_merge = lambda g, capacity=None, **kw: (launches.append(capacity), launch_merge(g, capacity, **kw))[1]
mix = {"v0": 0.6, "v1": -0.4}
plan = cycle(mix)
redone = [g.capacity for g in plan.groups if g.capacity > 1]
assert redone and launches == [None] * len(plan.groups) + redone, launches
launches.clear()
assert cycle(mix) is plan and launches == [None] * len(plan.groups), launches
mt.default_capacity, mt.launch_merge = default_capacity, launch_merge

# Per-layer fingerprint of a merged model: base_weight is bit for bit what unmerge writes back
mm._on_cuda_or_refuse = lambda layer: None
merge(model, mix)
for k, l in layers.items():
    assert torch.equal(mm.base_weight(l).view(torch.int16), orig[k].view(torch.int16)), k
unmerge(model)
assert exact()

# A model moved away and back while merged (new storage, the merged values): unmerge follows its weights; one
# cast while merged is refused before anything is restored, and unmerges once cast back
merge(model, mix)
for l in layers.values():
    l.weight.data = l.weight.data.clone()  # the storage that model.cpu().cuda() would leave
assert unmerge(model) == list(layers) and exact()
merge(model, mix)
merged = {k: l.weight.detach().clone() for k, l in layers.items()}
kept = layers["c"].weight.data
layers["c"].weight.data = kept.float()
try:
    unmerge(model)
    raise AssertionError("unmerged a cast weight")
except RuntimeError as e:
    assert "base weight of c is not where" in str(e), e
assert all(torch.equal(l.weight.data.to(torch.bfloat16), merged[k]) for k, l in layers.items())
layers["c"].weight.data = kept
assert unmerge(model) == list(layers) and exact()

# A fused merge is undone as a whole whichever module unmerge is given; a merge through a submodule is found by
# unmerge(root); a merged submodule makes merge(root) refuse
merge(model, mix)
assert unmerge(model.blk) == ["a", "b"] and exact() and unmerge(model) == []
assert merge(model.blk, mix) == ["a", "b"]
check(mix, ["blk.a", "blk.b"])
try:
    merge(model, mix)
    raise AssertionError("merged twice")
except RuntimeError as e:
    assert "already merged" in str(e), e
assert unmerge(model) == ["blk.a", "blk.b"] and exact()

# A module removed after the plan was kept: the launched merge is undone and the model planned afresh
cycle(mix)
removed = model.blk.b
del model.blk.b
layers = lora_layers(model)
cycle(mix, ["blk.a", "c"])
assert torch.equal(removed.weight.view(torch.int16), orig["blk.b"].view(torch.int16)) and removed.merged is None
model.blk.b = removed
layers = lora_layers(model)
cycle(mix)

# A weight given new storage between merges (the values unchanged): the kept plan launches group by group and stops
# at the first group whose weights moved; the groups launched before it are undone and the model planned afresh
kept = cycle(mix)
layers["c"].weight.data = layers["c"].weight.data.clone()  # c has a group of its own, launched after blk.a/blk.b's
assert cycle(mix) is not kept and exact()

# Refusals leave every bit as it was: a base weight that overflows under a kept plan (the key does not read W's
# values), then a NaN factor, twice each (a fresh plan, then the kept one)
huge = {"v0": 1e37, "v1": 0.0}  # every correction overflows int8: the whole weight goes to the overflow list
kept = cycle(huge)
l = layers["blk.b"]
d = (l.lora_B["v0"].double() @ l.lora_A["v0"].double()).view(-1)
i = int(d.abs().argmax())
with torch.no_grad():
    l.weight.view(-1)[i] = torch.finfo(torch.bfloat16).max * d[i].sign()  # W + delta overflows there alone
orig["blk.b"] = l.weight.detach().clone()
for _ in range(2):
    refused(huge, "blk.b")
    assert model.__dict__[mm.PLAN_ATTR] is kept
with torch.no_grad():
    l.weight.view(-1)[i] = 0.5
orig["blk.b"] = l.weight.detach().clone()
plan = cycle(mix)
with torch.no_grad():
    layers["c"].lora_B["v0"][0, 0] = float("nan")
for _ in range(2):
    refused(mix, "c")
assert model.__dict__[mm.PLAN_ATTR] is not plan
print("ok")
'''


def test_merge_py_fused_path_plans_reuses_invalidates_restores_and_refuses_in_interpreter():
    """merge() / unmerge() on the fused path (the CUDA path; CPU tensors through Triton's interpreter): merges within
    1 eps of float64, bit-exact unmerges, the kept plan reused only while nothing it was built from changed (an
    in-place step, replaced storage, blend weights, scales, the active blend, a removed module), the short overflow
    list, per-layer base weights, a whole-merge unmerge from a submodule, refusals with a fresh and a kept plan."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", MERGE_PY], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]
