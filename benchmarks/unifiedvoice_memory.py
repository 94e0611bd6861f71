"""Peak GPU memory of LoRA r8 training on a real full-size UnifiedVoice (upstream class, random weights).

Runs in its own process because upstream pins transformers 4.52 (run_all.py starts it with PYTHONPATH pointing
at an install of indextts2-cli + transformers 4.52.1); prints one JSON line. Batch 4, ~100 text + 500 mel
tokens, bf16 autocast, the frozen base stored in bf16 (LoRA parameters and AdamW state in fp32).
    python benchmarks/unifiedvoice_memory.py [--base-dtype fp32|bf16] [--tiny]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FULL_GPT = {  # IndexTTS2 checkpoints/config.yaml, `gpt:` section
    "model_dim": 1280, "max_mel_tokens": 1815, "max_text_tokens": 600, "heads": 20, "use_mel_codes_as_input": True,
    "mel_length_compression": 1024, "layers": 24, "number_text_tokens": 12000, "number_mel_codes": 8194,
    "start_mel_token": 8192, "stop_mel_token": 8193, "start_text_token": 0, "stop_text_token": 1,
    "train_solo_embeddings": False, "condition_type": "conformer_perceiver",
    "condition_module": {"output_size": 512, "linear_units": 2048, "attention_heads": 8, "num_blocks": 6,
                         "input_layer": "conv2d2", "perceiver_mult": 2},
    "emo_condition_module": {"output_size": 512, "linear_units": 1024, "attention_heads": 4, "num_blocks": 4,
                             "input_layer": "conv2d2", "perceiver_mult": 2},
}
TARGETS = ["gpt.h.*.attn.c_attn", "gpt.h.*.attn.c_proj", "gpt.h.*.mlp.c_fc", "gpt.h.*.mlp.c_proj"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-dtype", default=None, choices=["bf16", "fp32"],
                    help="the frozen base's storage (default: bf16 on CUDA, fp32 on the CPU)")
    ap.add_argument("--tiny", action="store_true", help="a CPU smoke test with a small config")
    ap.add_argument("--checkpointing", action="store_true",
                    help="non-reentrant activation checkpointing of the GPT blocks (train.py's gradient_checkpointing)")
    args = ap.parse_args()
    from indextts.gpt.model_v2 import UnifiedVoice

    from indextts_integration.gpt_loss import GPTBatch, fix_gradient_checkpointing, gpt_forward
    from lora_engine import LoRASpec, inject_lora, lora_layers

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    # CPU autocast leaves LayerNorm in its input's dtype, unlike CUDA's (fp32): a bf16 base there fails on
    # fp32 activations ("mixed dtype (CPU)"), so the CPU smoke test keeps the base in fp32.
    args.base_dtype = args.base_dtype or ("bf16" if dev == "cuda" else "fp32")
    cfg = dict(FULL_GPT)
    if args.tiny:
        cfg.update(model_dim=64, heads=4, layers=2)
    torch.manual_seed(0)
    model = UnifiedVoice(**cfg)
    fix_gradient_checkpointing(model, args.checkpointing)
    n_params = sum(p.numel() for p in model.parameters())
    model.to(dev, dtype=torch.bfloat16 if args.base_dtype == "bf16" else torch.float32)
    inject_lora(model, LoRASpec(target_modules=TARGETS, rank=8, alpha=16))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].normal_(0, 0.02)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    B, Lt, Lm, D = 4, 100, 500, cfg["model_dim"]
    g = torch.Generator().manual_seed(0)
    batch = GPTBatch(conditioning=torch.randn(B, 32, D, generator=g) * 0.1, emo_vec=torch.randn(B, D, generator=g) * 0.1,
                     text_ids=torch.randint(2, 12000, (B, Lt), generator=g), text_lengths=torch.tensor([Lt, 90, 80, 100]),
                     codes=torch.randint(0, 8192, (B, Lm), generator=g), code_lengths=torch.tensor([Lm, 450, 480, 400])).to(dev)
    batch.conditioning = batch.conditioning.to(next(model.parameters()).dtype)
    batch.emo_vec = batch.emo_vec.to(batch.conditioning.dtype)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):  # AdamW state exists from step 2 on: the peak includes it
        with torch.autocast(dev, dtype=torch.bfloat16):
            out = gpt_forward(model, batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
    print(json.dumps({"unifiedvoice_train_peak_gb": peak / 1e9 if peak else None, "params": n_params,
                      "base_dtype": args.base_dtype, "checkpointing": args.checkpointing, "batch": B, "text_tokens": Lt, "mel_tokens": Lm,
                      "lora_params": sum(p.numel() for p in params), "loss": float(out.loss)}))


if __name__ == "__main__":
    main()
