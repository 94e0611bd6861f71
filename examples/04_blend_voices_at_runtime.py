"""Blend adapters at runtime, unmerged: float weights for the whole batch, or a different mix per row.

set_blend(model, {"alice": 0.7, "bob": 0.3}) makes every wrapped layer compute
    y = base(x) + sum_i w_i * s_i * (x A_i^T) B_i^T
as one GEMM pair over the stacked ranks. A weight may be a 1-D tensor with one value per batch row, so one
batch can speak in several voices. Each result is checked against a float64 model whose weights are
W + sum_i w_i s_i (B_i A_i)^T, built from scratch.

    python examples/04_blend_voices_at_runtime.py
"""
import copy
import sys

import torch
from transformers import GPT2Config, GPT2Model

from lora_engine import LoRASpec, get_blend, inject_lora, lora_layers, set_blend

torch.manual_seed(0)
cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
base = GPT2Model(cfg).eval()
model = copy.deepcopy(base)
spec = LoRASpec(["h.*.attn.c_attn", "h.*.attn.c_proj", "h.*.mlp.c_fc", "h.*.mlp.c_proj"], rank=4, alpha=8)
inject_lora(model, spec, adapter="alice")
inject_lora(model, LoRASpec(spec.target_modules, rank=8, alpha=8), adapter="bob")  # ranks may differ
with torch.no_grad():  # stand-in for two trained voices
    for layer in lora_layers(model).values():
        for name in ("alice", "bob"):
            layer.lora_B[name].normal_(0, 0.05)


def reference(weights: dict[str, float]) -> GPT2Model:
    """float64 copy of the base with W + sum_i w_i s_i (B_i A_i)^T written into each Conv1D ([in, out])."""
    ref = copy.deepcopy(base).double()
    for path, layer in lora_layers(model).items():
        W = ref.get_submodule(path).weight
        for name, w in weights.items():
            A, B = layer.lora_A[name].double(), layer.lora_B[name].double()
            W.data += w * layer.scaling[name] * (B @ A).T
    return ref


def run(m, ids):
    with torch.no_grad():
        return m(ids).last_hidden_state.double()


ids = torch.randint(0, 100, (3, 12))
worst = 0.0

set_blend(model, {"alice": 0.7, "bob": 0.3})
err = (run(model, ids) - run(reference({"alice": 0.7, "bob": 0.3}), ids)).abs().max().item()
print(f"blend {get_blend(model)}: max abs error vs float64 = {err:.2e}")
worst = max(worst, err)

set_blend(model, {"alice": 1.0})
err = (run(model, ids) - run(reference({"alice": 1.0}), ids)).abs().max().item()
print(f"switch to alice alone: max abs error = {err:.2e}")
worst = max(worst, err)

set_blend(model, {})  # no adapter: the base model, exactly
base_exact = torch.equal(run(model, ids), run(base, ids))
print("empty blend runs the base exactly:", base_exact)

# One batch, three mixes: row 0 alice, row 1 bob, row 2 half of each.
set_blend(model, {"alice": torch.tensor([1.0, 0.0, 0.5]), "bob": torch.tensor([0.0, 1.0, 0.5])})
out = run(model, ids)
for row, mix in enumerate([{"alice": 1.0}, {"bob": 1.0}, {"alice": 0.5, "bob": 0.5}]):
    err = (out[row] - run(reference(mix), ids[row:row + 1])[0]).abs().max().item()
    print(f"per-row blend, row {row} {mix}: max abs error = {err:.2e}")
    worst = max(worst, err)

voices_differ = (run(reference({"alice": 1.0}), ids) - run(base, ids)).abs().max().item() > 1e-3
ok = worst < 2e-5 and base_exact and voices_differ
print(f"worst error {worst:.2e} (fp32 model vs float64 reference)")
print("OK" if ok else "FAILED")
sys.exit(0 if ok else 1)
