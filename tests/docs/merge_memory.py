"""What merge() keeps to make unmerge() exact, measured on one GPT-2 block of IndexTTS2's shape (n_embd 1280;
c_attn [1280, 3840], attn.c_proj [1280, 1280], mlp.c_fc [1280, 5120], mlp.c_proj [5120, 1280]), on CPU.

docs/architecture.md quotes this table; tests/docs/test_architecture.py checks it still holds.

    python -m tests.docs.merge_memory
"""
from __future__ import annotations

import subprocess
import sys

import torch
from transformers import GPT2Config, GPT2Model

from lora_engine import LoRASpec, inject_lora, lora_layers, merge, merge_memory_bytes, unmerge

TARGETS = ["h.*.attn.c_attn", "h.*.attn.c_proj", "h.*.mlp.c_fc", "h.*.mlp.c_proj"]


def gpt2_block(dtype: torch.dtype, rank: int = 8, adapters: int = 1, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=1280, n_layer=1, n_head=20, vocab_size=64, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2Model(cfg).eval().to(dtype)
    for k in range(adapters):
        inject_lora(model, LoRASpec(TARGETS, rank=rank, alpha=2 * rank), adapter=f"voice{k}")
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for B in layer.lora_B.values():
                B.normal_(0, 0.02)
    return model


def measure(dtype: torch.dtype, rank: int = 8, adapters: int = 1) -> dict[str, int]:
    """Bytes held while merged, split into the int8 correction, the stacked A/B/d, and the overflow list."""
    model = gpt2_block(dtype, rank, adapters)
    weights = {f"voice{k}": 1.0 / adapters for k in range(adapters)}
    merge(model, weights)
    layers = lora_layers(model).values()
    recs = [layer.merged for layer in layers]
    out = {
        "weight_elements": sum(r.correction.numel() for r in recs),
        "weight_bytes": sum(layer.weight.numel() * layer.weight.element_size() for layer in layers),
        "held_bytes": merge_memory_bytes(model),
        "correction_bytes": sum(r.correction.numel() for r in recs),
        "stacked_bytes": sum(t.numel() * t.element_size() for r in recs for t in (r.A, r.B, r.d)),
        "overflow_elements": sum(r.overflow_index.numel() for r in recs),
    }
    unmerge(model)
    return out


def _status_kib(field: str) -> int:
    line = next(ln for ln in open("/proc/self/status") if ln.startswith(field + ":"))
    return int(line.split()[1])


def _peak_rss_growth(dtype_name: str) -> int:
    """Peak resident memory growth (bytes) during one merge of the block, in a fresh process (Linux only:
    the peak is reset through /proc/self/clear_refs just before merging)."""
    import ctypes

    model = gpt2_block(getattr(torch, dtype_name))
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    before = _status_kib("VmRSS")
    merge(model)
    return (_status_kib("VmHWM") - before) * 1024


def main() -> None:
    print("| base dtype | merged weight bytes | held while merged | of which int8 correction | stacked A/B/d "
          "| overflow entries | peak RSS growth during merge |")
    print("|---|---|---|---|---|---|---|")
    for name in ("float32", "bfloat16", "float16"):
        m = measure(getattr(torch, name))
        peak = int(subprocess.run([sys.executable, "-c", f"from tests.docs.merge_memory import _peak_rss_growth; "
                                   f"print(_peak_rss_growth({name!r}))"], capture_output=True, text=True,
                                  check=True).stdout)
        print(f"| {name} | {m['weight_bytes'] / 2**20:.1f} MiB | {m['held_bytes'] / 2**20:.2f} MiB "
              f"({m['held_bytes'] / m['weight_bytes']:.3f}x) | {m['correction_bytes'] / 2**20:.2f} MiB "
              f"| {m['stacked_bytes'] / 2**10:.0f} KiB | {m['overflow_elements']} | {peak / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
