"""Save an adapter to one .safetensors file, read its header, load it into a fresh copy of the base.

The file holds `<module>.lora_A` [r, in] / `.lora_B` [out, r] and a JSON header (spec, shapes, training
summary, a fingerprint of the base weights). Loading into a different base model is refused unless forced.

    python examples/03_save_and_load.py
"""
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2Model

from lora_engine import LoRASpec, inject_lora, load_adapter, lora_layers, save_adapter
from lora_engine.adapter_io import BaseMismatchError, read_adapter_file


def base_model(seed: int) -> GPT2Model:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2Model(cfg).eval()


ids = torch.randint(0, 100, (2, 10))
model = base_model(seed=0)
inject_lora(model, LoRASpec(["h.*.attn.c_attn", "h.*.mlp.c_fc"], rank=4, alpha=8), adapter="alice")
with torch.no_grad():  # stand-in for training: a non-zero update
    for layer in lora_layers(model).values():
        layer.lora_B["alice"].normal_(0, 0.1)
    want = model(ids).last_hidden_state

workdir = tempfile.TemporaryDirectory()  # removed when the script exits
path = Path(workdir.name) / "alice.safetensors"
save_adapter(model, path, adapter="alice", training_summary={"steps": 0, "note": "example"})
tensors, header = read_adapter_file(path)
print(f"wrote {path.name}: {path.stat().st_size:,} bytes, {len(tensors)} tensors")
print("header:", json.dumps({k: header[k] for k in ("format", "format_version", "adapter", "training_summary")}))
print("spec:", header["spec"])
print("targets:", {p: (e["base_kind"], e["rank"]) for p, e in header["targets"].items()})
print("(the whole header: python -m lora_engine.adapter_io", path, ")")

fresh = base_model(seed=0)  # the same base weights, no adapter yet
name = load_adapter(fresh, path)  # injects the wrappers, checks the fingerprint, activates it
with torch.no_grad():
    got = fresh(ids).last_hidden_state
same = torch.equal(got, want)
print(f"loaded {name!r} into a fresh base: outputs identical: {same}")

other = base_model(seed=1)  # a different base model
try:
    load_adapter(other, path)
    refused = False
except BaseMismatchError as e:
    refused = not lora_layers(other)  # refused before touching the model
    print("different base refused, model untouched:", refused, "-", str(e)[:110], "...")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    load_adapter(other, path, strict_base=False)
print(f"strict_base=False loads it anyway, with a warning: {bool(caught)}")

ok = same and refused and bool(caught) and len(tensors) == 8
print("OK" if ok else "FAILED")
sys.exit(0 if ok else 1)
