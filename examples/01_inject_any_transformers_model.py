"""Put LoRA into any transformers model: a GPT-2 built from a tiny config (random weights, no download).

Shows: glob targets over module paths, what gets trainable, that the base state_dict keys are unchanged
(so checkpoints and loaders keep working), that a fresh adapter changes nothing (B starts at zero), the
LoRA math of one wrapped Conv1D checked in float64, and the error a mistyped target gives.

    python examples/01_inject_any_transformers_model.py
"""
import sys

import torch
from transformers import GPT2Config, GPT2Model

from lora_engine import LoRASpec, inject_lora, lora_layers

torch.manual_seed(0)
config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
model = GPT2Model(config).eval()
base_keys = list(model.state_dict())
ids = torch.randint(0, 100, (2, 10))
with torch.no_grad():
    before = model(ids).last_hidden_state

# `*` matches one path component: every block's fused q|k|v projection and MLP up-projection.
spec = LoRASpec(target_modules=["h.*.attn.c_attn", "h.*.mlp.c_fc"], rank=8, alpha=16)
names = inject_lora(model, spec, adapter="alice")
print("injected into:", names)

trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
total = sum(p.numel() for p in model.parameters())
print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

new_keys = [k for k in model.state_dict() if k not in base_keys]
print(f"base state_dict keys unchanged: {all(k in model.state_dict() for k in base_keys)}; "
      f"added: {len(new_keys)} (e.g. {new_keys[0]})")

with torch.no_grad():
    after_inject = model(ids).last_hidden_state
print("output right after injection is the base output:", torch.equal(before, after_inject))

# Pretend training happened: give alice a non-zero update, then check one layer against the math
# y = x W + b + (alpha / r) * (x A^T) B^T   (transformers Conv1D stores W as [in, out]).
layer = lora_layers(model)["h.0.attn.c_attn"]
with torch.no_grad():
    layer.lora_B["alice"].normal_(0, 0.1)
x = torch.randn(2, 10, 64)
with torch.no_grad():
    y = layer(x)
A, B = layer.lora_A["alice"].double(), layer.lora_B["alice"].double()
ref = x.double() @ layer.weight.double() + layer.bias.double() + (16 / 8) * (x.double() @ A.T) @ B.T
err = (y.double() - ref).abs().max().item()
print(f"c_attn output vs float64 formula: max abs error {err:.2e}")

try:
    inject_lora(model, LoRASpec(["h.*.attn.c_atn"]), adapter="typo")
    typo_refused = False
except ValueError as e:
    print("a mistyped target is refused:", e)
    typo_refused = "closest" in str(e).lower()

ok = (all(k in model.state_dict() for k in base_keys) and torch.equal(before, after_inject)
      and err < 1e-5 and typo_refused and len(names) == 4)
print("OK" if ok else "FAILED")
sys.exit(0 if ok else 1)
