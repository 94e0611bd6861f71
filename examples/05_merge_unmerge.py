"""Merge a blend into the base weights in place, then unmerge and get the original bits back, exactly.

merge() writes round(W + delta) into the same storage (fp32 accumulate, one rounding), so forward runs at
base speed. Subtracting the delta again would not give W back in bf16: the rounding lost bits. unmerge()
restores them from an int8 correction kept at merge time (1 byte per merged weight element).

    python examples/05_merge_unmerge.py
"""
import sys

import torch
from transformers import GPT2Config, GPT2Model

from lora_engine import LoRASpec, inject_lora, lora_layers, merge, merge_memory_bytes, set_blend, unmerge
from lora_engine.functional import delta_weight

torch.manual_seed(0)
cfg = GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
model = GPT2Model(cfg).eval().to(torch.bfloat16)
spec = LoRASpec(["h.*.attn.c_attn", "h.*.attn.c_proj", "h.*.mlp.c_fc", "h.*.mlp.c_proj"], rank=8, alpha=16)
for name in ("alice", "bob"):
    inject_lora(model, spec, adapter=name)
with torch.no_grad():  # stand-in for two trained voices
    for layer in lora_layers(model).values():
        for name in ("alice", "bob"):
            layer.lora_B[name].normal_(0, 0.02)

layers = lora_layers(model)
original = {p: layer.weight.detach().clone() for p, layer in layers.items()}
storage = {p: layer.weight.data_ptr() for p, layer in layers.items()}
ids = torch.randint(0, 100, (2, 16))
mix = {"alice": 0.6, "bob": 0.4}

set_blend(model, mix)
with torch.no_grad():
    unmerged_out = model(ids).last_hidden_state.float()
merged_paths = merge(model, mix)
with torch.no_grad():
    merged_out = model(ids).last_hidden_state.float()
changed = sum(int((layers[p].weight != original[p]).sum()) for p in merged_paths)
same_storage = all(layers[p].weight.data_ptr() == storage[p] for p in layers)
print(f"merged {len(merged_paths)} modules in place (same storage: {same_storage}); {changed:,} weights changed")
print(f"merged vs unmerged output (bf16): max abs diff {(merged_out - unmerged_out).abs().max().item():.3g}")

# What naive subtraction would give back, for comparison.
naive_wrong = 0
for p in merged_paths:
    rec, layer = layers[p].merged, layers[p]
    naive = (layer.weight.float() - delta_weight(rec.A, rec.B, rec.d, layer.layout)).to(torch.bfloat16)
    naive_wrong += int((naive != original[p]).sum())

held = merge_memory_bytes(model)
weight_bytes = sum(original[p].numel() * original[p].element_size() for p in merged_paths)
print(f"kept to undo the merge: {held:,} bytes for {weight_bytes:,} bytes of bf16 weights "
      f"({held / weight_bytes:.2f}x; a snapshot would be 1.00x)")

unmerge(model)
for _ in range(99):  # and 99 more cycles, alternating blends
    merge(model, {"alice": 1.0} if _ % 2 else mix)
    unmerge(model)
bits_changed = sum(int((layers[p].weight.view(torch.int16) != original[p].view(torch.int16)).sum()) for p in layers)
print(f"naive W - delta would leave {naive_wrong:,} weights wrong; "
      f"after 100 merge/unmerge cycles: {bits_changed} bits changed")

ok = same_storage and changed > 0 and naive_wrong > 0 and bits_changed == 0
print("OK" if ok else "FAILED")
sys.exit(0 if ok else 1)
