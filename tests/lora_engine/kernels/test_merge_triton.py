"""The fused merge/unmerge kernels, run on CPU through Triton's interpreter (TRITON_INTERPRET=1).

The interpreter executes the same kernel source with numpy, so CI (no GPU) proves the arithmetic and the
bookkeeping: the check pass counts, bit-exact restore (overflow list included), per-layer restore into a
separate buffer, both weight layouts, 16- and 32-bit dtypes. The GPU run (`benchmarks/run_all.py --check`) proves
the compiled kernels with lora_engine.kernels.selfcheck.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = r'''
import torch
from lora_engine.kernels import merge_triton as mt
assert mt.triton is not None, "triton is not importable"
torch.manual_seed(int(__import__("sys").argv[1]))
dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[__import__("sys").argv[2]]
layout = __import__("sys").argv[3]
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
g.config = dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)  # delta does not depend on the tiles
out = [torch.empty_like(Ws[1])]
mt.restore(g, out=out, only=1)
assert torch.equal(out[0], orig[1]) and not torch.equal(Ws[1], orig[1]), "per-layer restore"
mt.restore(g)
assert all(torch.equal(w.view(torch.uint8), o.view(torch.uint8)) for w, o in zip(Ws, orig)), "restore not bit-exact"
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
    p = subprocess.run([sys.executable, "-c", SCRIPT, "3", dtype, layout], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


MERGE_PY = r'''
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from lora_engine import LoRASpec, inject_lora, lora_layers
import sys
mm = sys.modules["lora_engine.merge"]
from lora_engine.kernels import merge_triton as mt
torch.manual_seed(0)
model = nn.Module()
model.a, model.b, model.c = nn.Linear(24, 40), nn.Linear(24, 40), Conv1D(48, 24)
model.to(torch.bfloat16)
for name in ("v0", "v1"):
    inject_lora(model, LoRASpec(["a", "b", "c"], rank=4, alpha=8), name)
with torch.no_grad():
    for layer in lora_layers(model).values():
        for p in [*layer.lora_A.values(), *layer.lora_B.values()]:
            p.normal_(0, 0.3)
layers = lora_layers(model)
orig = {k: l.weight.detach().clone() for k, l in layers.items()}
mix = {"v0": 0.7, "v1": -0.4}
def fused(mix):  # what merge() runs on CUDA; here through Triton's interpreter
    plan = mm._plan(lora_layers(model), mix)
    mm._merge_fused(plan, mm._factors(plan), cache)
cache = {}
fused(mix)
recs = {k: l.merged for k, l in layers.items()}
assert all(isinstance(r, mm.FusedMergeRecord) for r in recs.values())
assert len({id(r.group) for r in recs.values()}) == 2  # a and b share one group (same shape), c has its own
for k, l in layers.items():
    A, B = l.stacked(list(mix))
    want = (orig[k].float() + mm.delta_weight(A.detach(), B.detach(), l.stacked_scale(mix).float(), l.layout))
    assert (l.weight.float() - want.to(torch.bfloat16).float()).abs().max() <= 2 ** -7 * want.abs().max()
for g in {id(r.group): r.group for r in recs.values()}.values():
    mt.restore(g)
for l in layers.values():
    l.merged = None
assert all(torch.equal(l.weight, orig[k]) for k, l in layers.items())
def unmerge_all():
    for g in {id(l.merged.group): l.merged.group for l in layers.values()}.values():
        mt.restore(g)
    for l in layers.values():
        l.merged = None
before = {k: id(g) for k, g in cache.items()}
fused(mix)  # the same unchanged adapters: the cached snapshots and pointer tables are reused
assert {k: id(g) for k, g in cache.items()} == before
unmerge_all()
with torch.no_grad():
    layers["a"].lora_B["v0"].mul_(2.0)  # an in-place change (version bump): that group is rebuilt
fused(mix)
assert sorted(k for k, g in cache.items() if id(g) != before[k]) == [k for k in cache if k[2] == (40, 24)]
A, B = layers["a"].stacked(list(mix))
want = orig["a"].float() + mm.delta_weight(A.detach(), B.detach(), layers["a"].stacked_scale(mix).float(), "out_in")
assert (layers["a"].weight.float() - want.to(torch.bfloat16).float()).abs().max() <= 2 ** -7 * want.abs().max()
unmerge_all()
assert all(torch.equal(l.weight, orig[k]) for k, l in layers.items())
with torch.no_grad():
    layers["c"].lora_B["v0"][0, 0] = float("nan")
try:
    fused(mix)
    raise AssertionError("NaN merged")
except ValueError as e:
    assert "['c']" in str(e) and "nothing was written" in str(e), e
assert all(torch.equal(l.weight, orig[k]) and l.merged is None for k, l in layers.items())
print("ok")
'''


def test_merge_py_fused_path_groups_applies_restores_and_refuses_in_interpreter():
    """merge._merge_fused (the CUDA path of merge()) end to end on CPU tensors through the interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", MERGE_PY], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]
